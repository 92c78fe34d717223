"""Modern torchvision classifiers: the GC loss trains them, GMP replaces their head's pooling,
the builders and recipes accept them, and ViT is refused with a reason."""

import pytest
import torch
import torchvision
from torch import nn

from captum_consistency import GradCamConsistencyLoss, to_global_max_pool
from captum_consistency.builders import build_model, gradcam_layer, gradcam_layer_name
from tests._recipes import load_recipe


@pytest.mark.parametrize("arch", ["convnext_tiny", "efficientnet_b0", "mobilenet_v3_small",
                                  "mobilenet_v3_large", "regnet_y_400mf"])
def test_gc_loss_trains_the_architecture(arch):
    """Finite loss, and the consistency term alone reaches the first convolution (through the
    double backward of GELU / SiLU / Hardswish, layer scale and squeeze-excitation)."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4)
    layer = gradcam_layer(model)
    assert layer is model.get_submodule(gradcam_layer_name(arch))
    loss_fn = GradCamConsistencyLoss(model, layer, lam=25.0)
    x = torch.randn(2, 3, 64, 64)
    distractors = torch.randn(2, 3, 3, 64, 64)
    out = loss_fn(x, torch.tensor([0, 3]), distractors)
    assert torch.isfinite(out.loss) and out.consistency > 0
    assert out.saliency.shape == (2, 1, 2, 2) and out.composite_saliency.shape == (2, 1, 4, 4)
    stem = next(p for p in model.parameters() if p.dim() == 4)  # the first convolution
    (grad,) = torch.autograd.grad(out.consistency, stem, retain_graph=True)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny", "efficientnet_b0",
                                  "mobilenet_v3_small", "regnet_y_400mf"])
def test_gmp_replaces_the_head_pooling_only(arch):
    # module structure only (RegNet's builder computes its widths with tensors: not on meta)
    with torch.device("cpu" if arch.startswith("regnet") else "meta"):
        model = getattr(torchvision.models, arch)(num_classes=3)
    se_pools = [m for n, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d) and n != "avgpool"]
    to_global_max_pool(model)
    assert isinstance(model.avgpool, nn.AdaptiveMaxPool2d)
    # squeeze-and-excitation pools are channel attention, not the head: kept
    assert se_pools == [m for n, m in model.named_modules()
                        if isinstance(m, nn.AdaptiveAvgPool2d) and n != "avgpool"]
    if arch != "resnet18":
        assert se_pools or arch == "convnext_tiny"


def test_gmp_changes_a_convnext_output_to_max_pooled_features():
    torch.manual_seed(0)
    model = to_global_max_pool(build_model("convnext_tiny", 3)).eval()
    x = torch.randn(1, 3, 64, 64)
    feats = {}
    handle = model.features.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    logits = model(x)
    handle.remove()
    torch.testing.assert_close(logits, model.classifier(feats["a"].amax(dim=(2, 3), keepdim=True)))


@pytest.mark.parametrize("arch,reason", [
    ("vgg11", "pool to 7x7"), ("alexnet", "pool to 7x7 / 6x6"), ("densenet121", "F.adaptive_avg_pool2d"),
    ("vit_b_16", "class token"),
])
def test_gmp_refuses_models_without_global_average_pooling(arch, reason):
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    with pytest.raises(ValueError, match=f"no global average pooling.*{reason}"):
        to_global_max_pool(model)
    if arch == "densenet121":
        with pytest.raises(ValueError, match="gmp=True needs a global average pooling"):
            build_model(arch, 3, gmp=True)


def test_vit_is_refused_for_the_gc_loss():
    with pytest.raises(ValueError, match="vit_b_16.*position embeddings fix the input size"):
        build_model("vit_b_16", 10)
    with torch.device("meta"):
        vit = torchvision.models.vit_b_16()
    with pytest.raises(ValueError, match="no Grad-CAM layer for the GC loss.*2S x 2S composite"):
        gradcam_layer(vit)


def test_densenet_layer_is_before_the_in_place_relu():
    torch.manual_seed(0)
    model = build_model("densenet121", 3)
    assert gradcam_layer(model) is model.features.denseblock4
    assert gradcam_layer_name("densenet121") == "features.denseblock4"
    assert gradcam_layer_name("regnet_x_8gf") == "trunk_output"
    assert gradcam_layer_name("vgg19_bn") == "features.51"


def test_recipes_accept_the_architectures_and_every_method():
    from captum_consistency.attr import available_attributions

    def load(name):
        return load_recipe(name, prefix="_recipe_arch")

    train = load("train").get_args_parser()
    for arch in ("convnext_tiny", "efficientnet_b0", "mobilenet_v3_large", "densenet121",
                 "regnet_y_400mf", "vgg16_bn", "resnext50_32x4d"):
        assert train.parse_args(["--data", "synthetic", "--arch", arch, "--output-dir", "x"]).arch == arch
    evaluate = load("evaluate").get_args_parser()
    for name in available_attributions():
        args = evaluate.parse_args(["--checkpoint", "c.pth", "--output-dir", "x", "--method", name])
        assert args.method == name


def test_input_size_check_builds_every_family():
    """The recipes' up-front size check builds the model on the meta device; RegNet's builder
    needs real tensors for its widths and is built on the CPU, then moved."""
    from captum_consistency.engine import check_input_size

    for arch in ("convnext_tiny", "efficientnet_b0", "mobilenet_v3_small", "densenet121",
                 "regnet_y_400mf", "vgg11"):
        assert check_input_size(arch, 64, 2) in (1, 2), arch
    with torch.device("meta"):
        model = build_model("regnet_x_400mf", 3)
    assert next(model.parameters()).is_meta
    with pytest.raises(ValueError, match="too small for convnext_tiny"):
        check_input_size("convnext_tiny", 8, 2)


def test_one_table_of_families_names_the_builders_layers_and_reports(monkeypatch):
    """The registry's family table is the one source of the buildable architectures, their
    Grad-CAM layers (without building a model where the layer is fixed) and their report names."""
    from captum_consistency.attr import ARCHITECTURE_FAMILIES, METHODS, available_attributions, default_layers
    from captum_consistency.attr._families import family_of_model_name
    from captum_consistency.builders import ARCHITECTURES
    from captum_consistency.engine.datasets import ARCH_NAMES, model_name

    assert METHODS == tuple(available_attributions())
    timm_families = {f for f in ARCHITECTURE_FAMILIES if f.startswith("timm-")}  # built as timm:NAME
    assert {family_of_model_name(a) for a in ARCHITECTURES} == set(ARCHITECTURE_FAMILIES) - {"vit"} - timm_families
    assert set(ARCH_NAMES) == set(ARCHITECTURES)
    assert (ARCH_NAMES["resnet18"], ARCH_NAMES["resnet50"], ARCH_NAMES["alexnet"]) == ("ResNet18", "ResNet50", "AlexNet")
    assert ARCH_NAMES["resnext50_32x4d"] == "ResNeXt50_32x4d" and ARCH_NAMES["convnext_tiny"] == "ConvNeXt-tiny"
    assert model_name({"arch": "resnet18", "gmp": True}) == "ResNet18 GMP + GC"  # lambda 25 by default
    assert model_name({"arch": "alexnet", "data": "coco", "args": {"gc_lambda": 0.0}}) == "AlexNet Baseline"
    with pytest.raises(ValueError, match="unknown arch 'resnet18'; valid: resnet, vgg"):
        default_layers(torchvision.models.resnet18(), "resnet18")

    def no_build(*args, **kwargs):
        raise AssertionError("the layer name of a family with a fixed layer needs no model")

    for arch in ("resnet50", "regnet_y_400mf", "densenet121", "convnext_tiny", "alexnet"):
        monkeypatch.setattr(torchvision.models, arch, no_build)
    assert [gradcam_layer_name(a) for a in ("resnet50", "regnet_y_400mf", "densenet121", "convnext_tiny", "alexnet")] \
        == ["layer4", "trunk_output", "features.denseblock4", "features", "features"]
