"""timm classifiers: every registry name on tiny timm ResNet and ConvNeXt models, the GC loss
trains each timm family of the family table, GMP replaces their head's pooling, the recipe's
``--arch timm:NAME`` builds them, and a missing timm is a clear error."""

import sys

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.convnext import ConvNeXt  # noqa: E402
from timm.models.resnet import BasicBlock, ResNet  # noqa: E402

from captum_consistency import GradCamConsistencyLoss, to_global_max_pool  # noqa: E402
from captum_consistency.attr import (  # noqa: E402
    ARCHITECTURE_FAMILIES,
    available_attributions,
    default_layers,
    detect_architecture,
    get_attribution,
)
from captum_consistency.attr._families import TIMM_FAMILIES  # noqa: E402
from captum_consistency.builders import build_model, gradcam_layer, gradcam_layer_name  # noqa: E402
from tests._recipes import load_recipe  # noqa: E402
from tests.test_transfer_methods import _check_map, _run, check_every_name_on_convnext  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Setting .*(hooks|attributes):UserWarning")

# The smallest timm model of each family (the default layer is read from the class).
SMALLEST = {
    "timm-resnet": "timm:resnet10t",
    "timm-convnext": "timm:convnext_atto",
    "timm-efficientnet": "timm:tinynet_e",
    "timm-regnet": "timm:regnetx_002",
}


def _tiny_resnet():
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5, channels=(8, 8, 16, 16), stem_width=8).eval()


def _tiny_convnext():
    torch.manual_seed(0)
    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=5)
    for block in model.modules():  # layer scale 1e-6 would make the blocks near-identities
        if isinstance(getattr(block, "gamma", None), nn.Parameter):
            nn.init.constant_(block.gamma, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    """The tiny timm models and a batch they map at 2 x 2 (stride 32)."""
    torch.manual_seed(1)
    return {"resnet": _tiny_resnet(), "convnext": _tiny_convnext(), "x": torch.randn(2, 3, 64, 64)}


def _check(sal):
    _check_map(sal, shape=(2, 1, 64, 64), every_sample=False)  # a ReLU'd CAM may be zero for one


def test_the_timm_families_are_in_the_one_table():
    assert set(TIMM_FAMILIES) <= set(ARCHITECTURE_FAMILIES)
    assert detect_architecture(_tiny_resnet()) == "timm-resnet"
    assert detect_architecture(_tiny_convnext()) == "timm-convnext"
    assert default_layers(_tiny_resnet()) == {
        "layer": "layer4", "saliency_layer": "layer3", "contrast_layer": "global_pool",
        "classifier_layer": "fc"}


@pytest.mark.parametrize("name", available_attributions())
def test_every_name_on_a_tiny_timm_resnet(tiny, name):
    method, sal, caught = _run(name, tiny["resnet"], tiny["x"])
    _check(sal)
    assert method.arch == "timm-resnet" and method.num_classes == 5
    assert not [m for m in caught if "ordinary gradient" in m], caught  # ReLUs only
    if "layer" in method.layers and name != "cmwp":
        assert method.layers == {"layer": "layer4"}


@pytest.mark.parametrize("name", available_attributions())
def test_every_name_on_a_tiny_timm_convnext(tiny, name):
    check_every_name_on_convnext(tiny["convnext"], tiny["x"], name, "timm-convnext", "stages", _check)


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_gc_loss_trains_each_timm_family(family):
    """Finite loss; the consistency term alone reaches the first convolution, and the whole
    loss gives finite, non-zero gradients to the backbone."""
    arch = SMALLEST[family]
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4)
    assert detect_architecture(model) == family
    layer = gradcam_layer(model)
    assert layer is model.get_submodule(gradcam_layer_name(arch))
    loss_fn = GradCamConsistencyLoss(model, layer, lam=25.0)
    out = loss_fn(torch.randn(2, 3, 64, 64), torch.tensor([0, 3]), torch.randn(2, 3, 3, 64, 64))
    assert torch.isfinite(out.loss) and out.consistency > 0
    assert out.saliency.shape == (2, 1, 2, 2) and out.composite_saliency.shape == (2, 1, 4, 4)
    stem = next(p for p in model.parameters() if p.dim() == 4)
    (grad,) = torch.autograd.grad(out.consistency, stem, retain_graph=True)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    out.loss.backward()
    backbone = [p for n, p in model.named_parameters() if p.grad is not None and p.dim() == 4]
    assert backbone and all(torch.isfinite(p.grad).all() for p in backbone)
    assert sum(float(p.grad.abs().sum()) for p in backbone) > 0


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_gmp_replaces_the_timm_head_pooling(family):
    torch.manual_seed(0)
    model = build_model(SMALLEST[family], 3).eval()
    heads = [m for m in model.modules() if type(m).__name__ == "SelectAdaptivePool2d"]
    assert len(heads) == 1
    head = heads[0]
    seen = {}
    handle = head.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    to_global_max_pool(model)
    assert isinstance(head.pool, nn.AdaptiveMaxPool2d) and head.pool_type == "max"
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    handle.remove()
    torch.testing.assert_close(seen["out"].flatten(1), seen["inp"].amax(dim=(2, 3)))
    # the recipe's flag goes the same way
    assert isinstance(next(m for m in build_model(SMALLEST[family], 3, gmp=True).modules()
                           if type(m).__name__ == "SelectAdaptivePool2d").pool, nn.AdaptiveMaxPool2d)


def test_build_model_refuses_unknown_or_other_timm_models():
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        build_model("timm:no_such_net", 3)
    with pytest.raises(ValueError, match="VisionTransformer, not one of the timm families"):
        with torch.device("meta"):
            build_model("timm:vit_tiny_patch16_224", 3)


def test_recipe_takes_timm_archs_and_refuses_others_with_usage_errors(capsys):
    train = load_recipe("train", prefix="_recipe_timm").get_args_parser()
    for arch in SMALLEST.values():
        assert train.parse_args(["--data", "synthetic", "--arch", arch, "--output-dir", "x"]).arch == arch
    assert train.parse_args(["--data", "synthetic", "--arch", "convnext_tiny", "--output-dir", "x"]).arch == "convnext_tiny"
    for bad, message in (("timm:vit_tiny_patch16_224", "not one of the timm families"),
                         ("timm:no_such_net", "timm has no model"), ("resnet9000", "invalid choice")):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(["--data", "synthetic", "--arch", bad, "--output-dir", "x"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r"timm is not installed: pip install 'captum-consistency\[timm\]'"):
        build_model("timm:resnet18", 3)
    # torchvision models do not need it
    assert detect_architecture(build_model("resnet18", 3)) == "resnet"


def test_train_recipe_trains_a_timm_model_and_logs_its_panels(tmp_path, one_thread):
    from tests._recipes import run_recipe

    train = load_recipe("train", prefix="_recipe_timm_run")
    out = tmp_path / "run"
    record = run_recipe(train, [
        "--data", "synthetic", "--arch", "timm:resnet10t", "--gmp", "--image-size", "64",
        "--epochs", "1", "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "--workers", "0",
        "--synthetic-train-length", "8", "--synthetic-val-length", "8", "--no-progress",
        "--log-images", "2", "--log-subset", "4", "--output-dir", out])
    assert record["epoch"] == 1 and record["train"]["consistency"] > 0
    assert {"nqh", "pg", "ch"} <= set(record["val_subset"]) <= {"nqh", "pg", "ch", "ablation_share", "own_cell_predicted"}
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["arch"] == "timm:resnet10t" and saved["gmp"] is True
    rebuilt = build_model(saved["arch"], saved["num_classes"], gmp=True)
    rebuilt.load_state_dict(saved["model"])  # the checkpoint rebuilds (evaluate.py's path)
