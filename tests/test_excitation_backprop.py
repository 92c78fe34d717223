"""ContrastiveExcitationBackprop against TorchRay and a hand-computed two-layer case."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchray.attribution.excitation_backprop import contrastive_excitation_backprop, update_resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

from captum_consistency import to_global_max_pool
from captum_consistency.attr import ContrastiveExcitationBackprop


def _seeded(arch, seed=0, **kwargs):
    torch.manual_seed(seed)
    return _seeded_bn(getattr(torchvision.models, arch)(weights=None, **kwargs))


def _seeded_bn(model):
    for m in model.modules():  # make batch norm a non-trivial affine map
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


def _not_inplace(model):
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


def _assert_rel_close(actual, expected, rtol=1e-4):
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0 and torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale.item())


@pytest.fixture(scope="module")
def alexnet():
    return _seeded("alexnet")


@pytest.fixture(scope="module")
def vgg11():
    return _seeded("vgg11", num_classes=100)


CASES = [
    # the registry's (paper/TorchRay) layers: pool2 / pool4, relu7, last linear
    ("alexnet", 112, "features.5", "classifier.5", "classifier.6"),
    # saliency at a conv output followed by a ReLU, contrast at pool5, classifier found
    ("alexnet", 112, "features.8", "features.12", None),
    ("vgg11", 64, "features.15", "classifier.4", "classifier.6"),
    ("vgg11", 64, "features.5", "features.20", None),
]


@pytest.mark.parametrize("arch,size,layer,contrast,classifier", CASES)
def test_matches_torchray_batched(arch, size, layer, contrast, classifier, request):
    model = _not_inplace(request.getfixturevalue(arch))
    torch.manual_seed(1)
    x = torch.randn(4, 3, size, size)
    target = torch.tensor([3, 17, 42, 99])
    cmwp = ContrastiveExcitationBackprop(model, layer, contrast, classifier)
    ours = cmwp.attribute(x, target)
    ref = contrastive_excitation_backprop(model, x, target, layer, contrast, classifier)
    assert ours.shape[:2] == (4, 1)
    _assert_rel_close(ours, ref)
    # batch size 1 too (compared at equal batch sizes: the contrast cancels most of the signal,
    # so the convolutions' batch-size-dependent rounding shows at ~1e-3 relative)
    for i in (0, 3) if arch == "alexnet" else ():  # VGG's 100M-weight fc6 makes each call slow
        single = contrastive_excitation_backprop(model, x[i : i + 1], int(target[i]), layer, contrast, classifier)
        _assert_rel_close(cmwp.attribute(x[i : i + 1], int(target[i])), single)
    # and the maps depend on the target
    other = cmwp.attribute(x, target.flip(0))
    assert not torch.allclose(other, ours)
    assert (ours >= 0).all() and (ours > 0).any()


def test_inplace_relu_same_as_not_inplace(alexnet):
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in alexnet.modules())
    x = torch.randn(2, 3, 112, 112)
    args = ("features.8", "classifier.5", "classifier.6")
    a = ContrastiveExcitationBackprop(alexnet, *args).attribute(x, [1, 2])
    b = ContrastiveExcitationBackprop(_not_inplace(alexnet), *args).attribute(x, [1, 2])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _small_resnet(block, seed=0):
    """A torchvision ResNet with one block per stage (cheap, same block classes)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet.ResNet(block, [1, 1, 1, 1], num_classes=20)
    return _seeded_bn(model)


@pytest.mark.parametrize(
    "arch,gmp", [("resnet18", False), ("bottleneck", False), ("basicblock", True)]
)
def test_resnet_residual_split_matches_torchray(arch, gmp):
    """TorchRay rewrites the blocks' forward (update_resnet); ours hooks the blocks."""
    if arch == "resnet18":
        model = _seeded(arch, num_classes=20)
    else:
        block = {"bottleneck": Bottleneck, "basicblock": BasicBlock}[arch]
        model = _small_resnet(block)
    if gmp:
        to_global_max_pool(model)
    reference = update_resnet(_not_inplace(model))
    x = torch.randn(3, 3, 64, 64)
    target = [0, 7, 19]
    ours = ContrastiveExcitationBackprop(model, "layer3", "avgpool", "fc").attribute(x, target)
    ref = contrastive_excitation_backprop(reference, x, target, "layer3", "avgpool", "fc")
    _assert_rel_close(ours, ref)
    # the same model without the split (plain gradient at the additions) gives another map
    ours_inner = ContrastiveExcitationBackprop(model, "layer2", "layer4", "fc").attribute(x, target)
    ref_inner = contrastive_excitation_backprop(reference, x, target, "layer2", "layer4", "fc")
    _assert_rel_close(ours_inner, ref_inner)


def test_hand_computed_two_layer():
    torch.manual_seed(0)
    l1, l2 = nn.Linear(6, 5), nn.Linear(5, 4)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), l1, nn.ReLU(), l2).eval()
    x = torch.randn(7, 3)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    ours = ContrastiveExcitationBackprop(model, model[2], model[3], model[4]).attribute(x, target)

    with torch.no_grad():
        h = l1(torch.relu(model[0](x)))  # saliency layer output
        a = torch.relu(h)  # contrast layer output = classifier input
        onehot = nn.functional.one_hot(target, 4).float()

        def excite(w):  # p' = a * w+^T (p / (w+ a))
            wp = w.clamp(min=0)
            return a * ((onehot / (a @ wp.T + 1e-20)) @ wp)

        diff = excite(l2.weight) - excite(-l2.weight)  # subtracted at the contrast layer
        expected = (diff * (h > 0)).sum(1, keepdim=True).clamp(min=0)  # through the ReLU
    assert ours.shape == (7, 1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert (expected > 0).any()


def test_restores_modes_and_requires_grad(alexnet):
    model = copy.deepcopy(alexnet).train()
    model.features[0].weight.requires_grad_(False)
    model.classifier[1].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    x = torch.randn(2, 3, 112, 112)
    ContrastiveExcitationBackprop(model, "features.5", "classifier.5").attribute(x, 1)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())


def test_target_none_is_prediction(alexnet):
    x = torch.randn(3, 3, 112, 112)
    cmwp = ContrastiveExcitationBackprop(alexnet, "features.5", "classifier.5")
    with torch.no_grad():
        pred = alexnet(x).argmax(1)
    torch.testing.assert_close(cmwp.attribute(x), cmwp.attribute(x, pred))


def test_errors(alexnet):
    with pytest.raises(ValueError, match="not a submodule"):
        ContrastiveExcitationBackprop(alexnet, "features.99", "classifier.5")
    with pytest.raises(ValueError, match="not a submodule"):
        ContrastiveExcitationBackprop(alexnet, nn.ReLU(), "classifier.5")
    with pytest.raises(TypeError, match="layer"):
        ContrastiveExcitationBackprop(alexnet, 3, "classifier.5")
    with pytest.raises(ValueError, match="classifier_layer must be"):
        ContrastiveExcitationBackprop(alexnet, "features.5", "classifier.5", "classifier.5")
    cmwp = ContrastiveExcitationBackprop(alexnet, "features.5", "classifier.5")
    x = torch.randn(2, 3, 112, 112)
    with pytest.raises(ValueError, match=r"target \[1000\] outside the classifier's range \[0, 1000\)"):
        cmwp.attribute(x, [3, 1000])
    with pytest.raises(ValueError, match="outside"):
        cmwp.attribute(x, -1)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        cmwp.attribute(x, [1, 2, 3])
    # contrast layer before the saliency layer
    with pytest.raises(ValueError, match="must run before"):
        ContrastiveExcitationBackprop(alexnet, "classifier.5", "features.5").attribute(x, 1)
    # the hooks are gone after an error
    assert all(len(m._forward_hooks) == 0 for m in alexnet.modules())


def test_unsupported_module_named_only_on_the_backward_path(alexnet):
    model = copy.deepcopy(alexnet)
    model.features[9] = nn.GELU()  # after the saliency layer features.5
    x = torch.randn(2, 3, 112, 112)
    with pytest.raises(ValueError, match=r"'features\.9' of type GELU"):
        ContrastiveExcitationBackprop(model, "features.5", "classifier.5").attribute(x, 1)
    # before the saliency layer it runs as an ordinary module
    model = copy.deepcopy(alexnet)
    model.features[1] = nn.GELU()
    out = ContrastiveExcitationBackprop(model, "features.5", "classifier.5").attribute(x, 1)
    assert out.shape == (2, 1, 6, 6)
    # or the user declares its ordinary gradient correct
    model.features[9] = nn.GELU()
    out = ContrastiveExcitationBackprop(
        model, "features.5", "classifier.5", ordinary_gradient_modules=(nn.GELU,)
    ).attribute(x, 1)
    assert out.shape == (2, 1, 6, 6)
