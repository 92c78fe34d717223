"""fold_batch_norm: the same function and the same Grad-CAM maps without batch-norm layers."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from captum_consistency import to_global_max_pool
from captum_consistency.attr import LayerElementwiseGradCam
from captum_consistency.engine.evaluation import evaluate_interpretations
from captum_consistency import CaptumConsistencyWarning, fold_batch_norm


def _with_trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters: folding the identity BN proves nothing."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_folded_resnet_computes_the_same_logits_and_element_wise_grad_cam(arch):
    torch.manual_seed(0)
    model = _with_trained_statistics(to_global_max_pool(getattr(torchvision.models, arch)(num_classes=7)))
    folded = fold_batch_norm(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # every BN follows a conv
    assert isinstance(folded.layer1[0].bn1, nn.Identity) and isinstance(folded.layer2[0].downsample[1], nn.Identity)
    assert folded.layer1[0].conv1.bias is not None
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    target = torch.tensor([3, 6])
    maps = LayerElementwiseGradCam(model, model.layer4).attribute(x, target=target, relu_attributions=True)
    maps_folded = LayerElementwiseGradCam(folded, folded.layer4).attribute(x, target=target, relu_attributions=True)
    torch.testing.assert_close(maps_folded, maps, rtol=1e-4, atol=1e-5)
    assert maps.sum() > 0


def test_returns_the_same_object_and_keeps_module_names_and_hooks():
    model = _with_trained_statistics(torchvision.models.resnet18(num_classes=3))
    layer4 = model.layer4
    seen = []
    layer4.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert fold_batch_norm(model) is model and model.layer4 is layer4
    model(torch.randn(1, 3, 32, 32))
    assert seen == [torch.Size([1, 512, 1, 1])]


class _SharedConvOutput(nn.Module):
    """The conv output feeds the batch norm *and* a skip: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        a = self.conv(x)
        return self.bn(a) + a + self.bn2(self.conv2(x))


def test_batch_norm_whose_conv_output_is_used_elsewhere_is_kept():
    model = _with_trained_statistics(_SharedConvOutput())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    fold_batch_norm(model)
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_training_mode_is_refused_with_the_module_named():
    model = torchvision.models.resnet18(num_classes=3).train()
    with pytest.raises(ValueError, match=r"eval mode; conv1 is in training mode"):
        fold_batch_norm(model)
    model.eval()
    model.layer2[0].bn1.train()  # one batch norm left in training mode is enough to refuse
    with pytest.raises(ValueError, match=r"layer2\.0\.bn1 is in training mode"):
        fold_batch_norm(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fold_batch_norm(lambda x: x)


class _DataDependentControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace this
            return self.bn(self.conv(x))
        return self.conv(x)


def test_untraceable_model_is_left_unchanged_with_a_warning():
    model = _DataDependentControlFlow().eval()
    with pytest.warns(CaptumConsistencyWarning, match="cannot be traced"):
        assert fold_batch_norm(model) is model
    assert isinstance(model.bn, nn.BatchNorm2d)
    # The test configuration (pyproject.toml) turns the library's warnings into errors
    # wherever a test does not expect them: this one would not go unnoticed.
    with pytest.raises(CaptumConsistencyWarning, match="cannot be traced"):
        fold_batch_norm(model)


def test_evaluation_metrics_are_unchanged_by_folding(tmp_path):
    from torch.utils.data import DataLoader

    from captum_consistency.data import SizeGroupedBatchSampler
    from captum_consistency.engine.datasets import build_dataset
    from tests._fixtures_data import make_imagenet_folder

    fx = make_imagenet_folder(tmp_path / "inet", num_classes=3, images_per_class=3, splits=("val",))
    whole = build_dataset("imagenet", "val", "whole", 32, data_root=fx.root, boxes=fx.boxes_dirs["val"])
    torch.manual_seed(0)
    model = _with_trained_statistics(to_global_max_pool(torchvision.models.resnet18(num_classes=3)))

    def run(m):
        sampler = SizeGroupedBatchSampler(whole.dataset.original_sizes(), 4, short_side=None)
        loader = DataLoader(whole.dataset, batch_sampler=sampler, collate_fn=whole.collate_fn)
        return evaluate_interpretations(
            m, "elementwise-gradcam", loader, None, torch.device("cpu"), num_classes=3,
            spg_generator=torch.Generator().manual_seed(0), progress=False,
        )

    plain, folded = run(model), run(fold_batch_norm(copy.deepcopy(model)))
    assert plain["num_images"] == folded["num_images"] == 9
    assert folded["pg_per_class"] == plain["pg_per_class"]
    assert folded["spg_mean"] == pytest.approx(plain["spg_mean"], abs=1e-9)
    assert folded["ch"] == pytest.approx(plain["ch"], abs=1e-6)
    assert 0 < plain["ch"] < 1
