"""The registry over Captum and pytorch-grad-cam: every name on tiny ResNet-18 / ConvNeXt / ViT
models, equality with direct calls of the wrapped libraries after the documented reduction, the
failure modes (missing layers, non-ReLU models, NaN maps) and the default layers of every
torchvision model of the supported families."""

import copy
import functools
import warnings

import pytest
import torch
import torchvision
from captum import attr as ca
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform as pgc_vit_reshape
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import pytorch_grad_cam as pgc
from captum_consistency import CaptumConsistencyWarning
from captum_consistency.attr import (
    available_attributions,
    default_layers,
    detect_architecture,
    get_attribution,
    vit_reshape_transform,
)
from captum_consistency.metrics import InterpretationMetrics
from captum_consistency.models import SmallResNet

# Captum says this at every direct call of its guided backprop and DeepLift (the peers here).
pytestmark = pytest.mark.filterwarnings("ignore:Setting .*(hooks|attributes):UserWarning")

PGC = {
    "pgc:gradcam": pgc.GradCAM,
    "pgc:hirescam": pgc.HiResCAM,
    "pgc:gradcam-elementwise": pgc.GradCAMElementWise,
    "pgc:gradcam++": pgc.GradCAMPlusPlus,
    "pgc:xgradcam": pgc.XGradCAM,
    "pgc:layercam": pgc.LayerCAM,
    "pgc:eigencam": pgc.EigenCAM,
    "pgc:eigengradcam": pgc.EigenGradCAM,
    "pgc:scorecam": pgc.ScoreCAM,
    "pgc:ablationcam": pgc.AblationCAM,
}
# Fewer steps/samples than the defaults: the tests check wiring and values, not convergence.
FAST_OPTIONS = {
    "captum:integrated-gradients": {"n_steps": 4},
    "captum:smoothgrad": {"nt_samples": 3},
}
# Methods whose modified-gradient rule does not cover ConvNeXt's GELU / LayerNorm.
RULE_WARNINGS = ("captum:guided-backprop", "captum:deconvolution", "captum:guided-gradcam", "captum:deeplift")
TARGET = torch.tensor([1, 3])


def _tiny_resnet18():
    # torchvision ResNet with ResNet-18's BasicBlock layout [2, 2, 2, 2], in-place ReLUs reused
    # twice per block, narrow widths
    torch.manual_seed(0)
    return SmallResNet(5, widths=(8, 8, 16, 16), layers=(2, 2, 2, 2)).eval()


def _tiny_convnext():
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5)
    for block in model.modules():  # layer scale 1e-6 would make the blocks near-identities
        if hasattr(block, "layer_scale"):
            nn.init.constant_(block.layer_scale, 0.5)
    return model.eval()


def _tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zeros
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    return _tiny_resnet18()


@pytest.fixture(scope="module")
def convnext():
    return _tiny_convnext()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def _run(name, model, x, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method = get_attribution(name, model, **{**FAST_OPTIONS.get(name, {}), **options})
        sal = method.attribute(x, TARGET)
    return method, sal, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _check_map(sal, shape=(2, 1, 32, 32), every_sample=True):
    assert sal.shape == shape and sal.dtype == torch.float32 and not sal.requires_grad
    assert torch.isfinite(sal).all() and (sal >= 0).all()
    mass = sal.flatten(1).sum(1)
    assert (mass > 0).all() if every_sample else (mass > 0).any()  # real maps


def test_names_follow_the_scheme():
    names = available_attributions()
    assert len(names) == len(set(names)) == 24
    assert names[:4] == ["gradcam", "elementwise-gradcam", "cmwp", "fullgrad"]
    assert available_attributions("pgc") == list(PGC)
    assert available_attributions("pytorch-grad-cam") == list(PGC)
    assert len(available_attributions("captum")) == 10
    assert all(n.startswith("captum:") for n in available_attributions("captum"))
    with pytest.raises(ValueError, match="unknown library"):
        available_attributions("timm")


@pytest.mark.parametrize("name", available_attributions())
def test_every_name_on_a_tiny_resnet18(resnet, x, name):
    method, sal, caught = _run(name, resnet, x)
    _check_map(sal)
    assert method.arch == "resnet" and method.num_classes == 5 and method.rule
    # ReLU networks are covered by every rule: no warning about unguided non-linearities
    assert not [m for m in caught if "ordinary gradient" in m], caught


@pytest.mark.parametrize("name", available_attributions())
def test_every_name_on_a_tiny_convnext(convnext, x, name):
    check_every_name_on_convnext(convnext, x, name, "convnext", "features", _check_map)


def check_every_name_on_convnext(convnext, x, name, arch, layer, check_map):
    """cMWP and FullGrad refused with their reasons, the others real maps at ``layer``; the
    modified-gradient rules warn about GELU (also for timm's ConvNeXt, tests/test_timm.py)."""
    if name == "cmwp":
        with pytest.raises(ValueError, match=f"cmwp has default layers for resnet, vgg, alexnet.*{arch}"):
            get_attribution(name, convnext)
        return
    if name == "fullgrad":  # not piecewise linear: refused, never a wrong map
        with pytest.raises(ValueError, match="FullGrad.*channels last.*GELU and LayerNorm"):
            get_attribution(name, convnext).attribute(x, TARGET)
        return
    method, sal, caught = _run(name, convnext, x)
    check_map(sal)
    assert method.arch == arch and method.num_classes == 5
    unguided = [m for m in caught if "ordinary gradient" in m]
    if name in RULE_WARNINGS:
        assert len(unguided) == 1 and "gelu" in unguided[0], caught
    else:
        assert not unguided, caught
    if "layer" in method.layers:
        assert method.layers == {"layer": layer}


# --------------------------------------------------------------------------- vs. the libraries


@pytest.mark.parametrize("name", list(PGC))
def test_pgc_adapter_equals_the_library(resnet, x, name):
    """The map is pytorch-grad-cam's array for the same model, layer, inputs and targets."""
    direct = PGC[name](resnet, [resnet.layer4])
    expected = torch.from_numpy(direct(x, [ClassifierOutputTarget(int(t)) for t in TARGET]))
    direct.activations_and_grads.release()
    params = list(resnet.parameters())
    for p in params:  # the direct call's backward() left gradients
        p.grad = None
    sentinel = torch.full_like(params[0], 7.0)
    params[0].grad = sentinel
    resnet.train()
    try:
        sal = get_attribution(name, resnet).attribute(x, TARGET)
        # the library's side effects are undone: training flags, .grad, swapped layers
        assert resnet.training and resnet.layer4.training
        assert params[0].grad is sentinel and all(p.grad is None for p in params[1:])
        assert isinstance(resnet.layer4, nn.Sequential)
        assert not resnet.layer4._forward_hooks
    finally:
        resnet.eval()
        params[0].grad = None
    torch.testing.assert_close(sal, expected.unsqueeze(1))


def test_scorecam_split_and_batch_size_options(resnet, x):
    """ScoreCAM runs one image per call by default (its memory grows with images x channels);
    the split and the masked-batch size do not change the map."""
    method = get_attribution("pgc:scorecam", resnet, batch_size=5)
    assert method.method.images_per_call == 1 and method.method.batch_size == 5
    whole = get_attribution("pgc:scorecam", resnet, images_per_call=2).attribute(x, TARGET)
    torch.testing.assert_close(method.attribute(x, TARGET), whole)
    with pytest.raises(ValueError, match="images_per_call must be a positive int"):
        get_attribution("pgc:scorecam", resnet, images_per_call=0)
    with pytest.raises(ValueError, match="pgc:gradcam does not take option.*batch_size.*it takes: images_per_call"):
        get_attribution("pgc:gradcam", resnet, batch_size=4)


def _captum_direct(name, model, x):
    t = TARGET
    if name == "captum:saliency":
        return ca.Saliency(model).attribute(x, t).abs().amax(1, keepdim=True)
    if name == "captum:input-x-gradient":
        return ca.InputXGradient(model).attribute(x, t).sum(1, keepdim=True).abs()
    if name == "captum:integrated-gradients":
        return ca.IntegratedGradients(model).attribute(x, target=t, n_steps=4).sum(1, keepdim=True).abs()
    if name == "captum:guided-backprop":
        return ca.GuidedBackprop(model).attribute(x, t).abs().amax(1, keepdim=True)
    if name == "captum:deconvolution":
        return ca.Deconvolution(model).attribute(x, t).abs().amax(1, keepdim=True)
    if name == "captum:guided-gradcam":
        return ca.GuidedGradCam(model, model.layer4).attribute(x, t).abs().amax(1, keepdim=True)
    if name == "captum:layer-gradcam":
        m = ca.LayerGradCam(model, model.layer4).attribute(x, t, relu_attributions=True)
        return ca.LayerAttribution.interpolate(m, (32, 32), "bilinear")
    if name == "captum:occlusion":
        # the default window at 32 px: side round(32 / 7) = 5, stride 2, over all channels
        a = ca.Occlusion(model).attribute(x, target=t, sliding_window_shapes=(3, 5, 5), strides=(3, 2, 2),
                                          perturbations_per_eval=16)
        return a.mean(1, keepdim=True).clamp(min=0)
    if name == "captum:smoothgrad":
        torch.manual_seed(5)
        stdev = 0.15 * float(x.max() - x.min())
        a = ca.NoiseTunnel(ca.Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=3, nt_samples_batch_size=1, stdevs=stdev,
            target=t, abs=False)
        return a.abs().amax(1, keepdim=True)
    raise KeyError(name)


@pytest.mark.parametrize("name", [
    "captum:saliency", "captum:input-x-gradient", "captum:integrated-gradients",
    "captum:guided-backprop", "captum:deconvolution", "captum:guided-gradcam",
    "captum:layer-gradcam", "captum:occlusion", "captum:smoothgrad",
])
def test_captum_adapter_equals_the_library(resnet, x, name):
    """Captum's attribution on the same inputs, reduced by the documented rule."""
    expected = _captum_direct(name, resnet, x)
    if name == "captum:smoothgrad":
        torch.manual_seed(5)
    sal = get_attribution(name, resnet, **FAST_OPTIONS.get(name, {})).attribute(x, TARGET)
    torch.testing.assert_close(sal, expected.detach())


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0)


class _GuidedReLUModule(nn.Module):
    def forward(self, x):
        return _GuidedReLU.apply(x)


def test_guided_backprop_with_in_place_and_reused_relus_is_guided(resnet, x):
    """torchvision ResNets call one in-place nn.ReLU twice per block; the map must still be the
    guided backprop of Springenberg et al.: an independent reference with its own ReLU."""
    reference = copy.deepcopy(resnet)
    for parent in reference.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, _GuidedReLUModule())
    inputs = x.clone().requires_grad_(True)
    score = reference(inputs).gather(1, TARGET.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, inputs)
    sal = get_attribution("captum:guided-backprop", resnet).attribute(x, TARGET)
    torch.testing.assert_close(sal, grad.abs().amax(1, keepdim=True))
    # and it is not the plain gradient
    plain = get_attribution("captum:saliency", resnet).attribute(x, TARGET)
    assert not torch.allclose(sal, plain)


class _TwoReluBlock(nn.Module):
    """torchvision's BasicBlock with a second ReLU module instead of a second call of the first."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.relu2 = nn.ReLU()

    def forward(self, x):
        b = self.block
        out = b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))
        identity = x if b.downsample is None else b.downsample(x)
        return self.relu2(out + identity)


def test_deeplift_on_a_resnet_reusing_its_relus(resnet, x):
    """Captum's DeepLift refuses modules called twice; the registry gives each call its own copy
    (torch.fx), which equals DeepLift on a ResNet written with distinct ReLU modules."""
    with pytest.raises(RuntimeError, match="used more than once"):
        ca.DeepLift(resnet).attribute(x, target=TARGET)
    reference = copy.deepcopy(resnet)
    for stage in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
        for i in range(len(stage)):
            stage[i] = _TwoReluBlock(stage[i])
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    expected = ca.DeepLift(reference).attribute(x, target=TARGET).sum(1, keepdim=True).abs()
    method = get_attribution("captum:deeplift", resnet)
    torch.testing.assert_close(method.attribute(x, TARGET), expected)
    assert isinstance(method.method.method.forward_func, torch.fx.GraphModule)
    # DeepLift's summation to delta holds on the traced copy (it is the same function)
    _, delta = ca.DeepLift(method.method.method.forward_func).attribute(
        x, target=TARGET, return_convergence_delta=True)
    assert delta.abs().max() < 1e-3


def test_deeplift_without_reuse_equals_captum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    method = get_attribution("captum:deeplift", model)
    assert method.arch is None and method.num_classes is None
    expected = ca.DeepLift(model).attribute(x, target=TARGET).sum(1, keepdim=True).abs()
    torch.testing.assert_close(method.attribute(x, TARGET), expected)
    assert method.method.method.forward_func is model  # no reuse: the model itself


def test_unguided_functional_relu_is_reported():
    """DenseNet applies F.relu in forward(), outside any nn.ReLU: guided backprop warns."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8,
                                        bn_size=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(CaptumConsistencyWarning, match=r"guided-backprop rule .* ReLU modules only.*relu x1"):
        sal = get_attribution("captum:guided-backprop", model, arch="densenet").attribute(x, TARGET)
    _check_map(sal)


# --------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("name", list(PGC))
def test_pgc_on_vit_with_the_reshape_transform(x, name):
    model = _tiny_vit()
    method = get_attribution(name, model)
    assert method.arch == "vit" and method.layers == {"layer": "encoder.layers.encoder_layer_1.ln_1"}
    sal = method.attribute(x, TARGET)
    _check_map(sal)
    if name == "pgc:gradcam":  # = the library with its own ViT transform on a 4x4 token grid
        reshape = functools.partial(pgc_vit_reshape, height=4, width=4)
        direct = pgc.GradCAM(model, [model.encoder.layers[-1].ln_1], reshape_transform=reshape)
        expected = direct(x, [ClassifierOutputTarget(int(t)) for t in TARGET])
        direct.activations_and_grads.release()
        torch.testing.assert_close(sal, torch.from_numpy(expected).unsqueeze(1))


def test_vit_refuses_convolutional_layer_methods(x):
    model = _tiny_vit()
    for name in ("gradcam", "elementwise-gradcam", "captum:layer-gradcam", "captum:guided-gradcam"):
        with pytest.raises(ValueError, match="vision transformer.*use a pgc: method"):
            get_attribution(name, model)
    _check_map(get_attribution("captum:saliency", model).attribute(x, TARGET))
    from captum_consistency.engine.evaluation import SaliencyExplainer

    with pytest.raises(ValueError, match="vision transformer.*use a pgc: method"):
        SaliencyExplainer(model, "elementwise-gradcam")
    maps = SaliencyExplainer(model, "pgc:layercam")(x, torch.tensor([0, 1]), TARGET)
    _check_map(maps)
    tokens = torch.randn(2, 1 + 16, 8)
    torch.testing.assert_close(vit_reshape_transform(tokens), pgc_vit_reshape(tokens, 4, 4))
    with pytest.raises(ValueError, match="do not form a 4x5 grid"):
        vit_reshape_transform(tokens, 4, 5)


# --------------------------------------------------------------------------- failure modes


def test_model_without_a_default_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="pgc:gradcam needs a target layer .* pass layer="):
        get_attribution("pgc:gradcam", model)
    method = get_attribution("pgc:gradcam", model, layer="1")
    assert method.layers == {"layer": "1"}
    # a random 4-channel net: one sample's CAM may be negative everywhere (all zero after ReLU)
    _check_map(method.attribute(x, TARGET), (2, 1, 16, 16), every_sample=False)
    _check_map(get_attribution("captum:saliency", model).attribute(x, TARGET), (2, 1, 16, 16))
    with pytest.raises(ValueError, match="layer='head' is not a submodule"):
        get_attribution("captum:layer-gradcam", model, layer="head")


def test_option_errors(resnet):
    with pytest.raises(ValueError, match="captum:integrated-gradients does not take option.*n_step\\b.*it takes: .*n_steps"):
        get_attribution("captum:integrated-gradients", resnet, n_step=3)
    with pytest.raises(ValueError, match="cmwp does not take option.*it takes: no options"):
        get_attribution("cmwp", resnet, eps=1.0)
    with pytest.raises(ValueError, match="additional_forward_args are not supported"):
        get_attribution("pgc:gradcam", resnet).attribute(torch.zeros(1, 3, 32, 32), 0, additional_forward_args=(1,))
    assert get_attribution("PGC:GradCAM++", resnet).name == "pgc:gradcam++"
    assert get_attribution("pytorch-grad-cam:xgradcam", resnet).name == "pgc:xgradcam"


class _NaNForSecond(nn.Module):
    """Multiplies the second image's layer output by NaN: the peer library's map becomes NaN."""

    def forward(self, x):
        scale = torch.ones(x.shape[0], 1, 1, 1)
        scale[1] = float("nan")
        return x * scale


@pytest.mark.parametrize("name", ["pgc:gradcam", "captum:saliency"])
def test_nan_maps_are_zeroed_and_skipped_by_the_metrics(name):
    model = _tiny_resnet18()
    model.layer3 = nn.Sequential(model.layer3, _NaNForSecond())
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(CaptumConsistencyWarning, match="1 of 2 maps are not finite.*all-zero maps, which the metrics skip"):
        sal = get_attribution(name, model).attribute(x, TARGET)
    assert (sal[0] > 0).any() and (sal[1] == 0).all()
    metrics = InterpretationMetrics(num_classes=5, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    metrics.update(sal, masks, TARGET)
    result = metrics.compute()
    assert result["num_images"] == 1 and result["skipped_images"] == 1


# --------------------------------------------------------------------------- architectures

FAMILY_OF_PREFIX = {
    "resnet": "resnet", "resnext": "resnet", "wide_resnet": "resnet", "vgg": "vgg",
    "alexnet": "alexnet", "convnext": "convnext", "efficientnet": "efficientnet",
    "mobilenet_v3": "mobilenetv3", "densenet": "densenet", "regnet": "regnet", "vit": "vit",
}


def _family(arch):
    return next(f for p, f in FAMILY_OF_PREFIX.items() if arch.startswith(p))


def _on_meta(arch, monkeypatch):
    """The torchvision model ``arch`` on the meta device (module names and shapes, no memory)."""
    import torchvision.models.regnet as regnet

    original = regnet.BlockParams.from_init_params.__func__

    def widths_on_cpu(cls, *args, **kwargs):  # RegNet computes its widths with tensors
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    monkeypatch.setattr(regnet.BlockParams, "from_init_params", classmethod(widths_on_cpu))
    with torch.device("meta"):
        return getattr(torchvision.models, arch)()


# The smallest model of each family (the default layer is read from the class, not the size).
SMALLEST = ("resnet18", "vgg11", "alexnet", "convnext_tiny", "efficientnet_b0",
            "mobilenet_v3_small", "densenet121", "regnet_y_400mf")


def test_every_torchvision_model_of_the_families_is_buildable():
    from captum_consistency.builders import ARCHITECTURES

    listed = torchvision.models.list_models(module=torchvision.models)
    expected = [n for n in listed if _family_or_none(n) not in (None, "vit")]
    assert sorted(ARCHITECTURES) == sorted(expected) and len(ARCHITECTURES) >= 50
    assert set(SMALLEST) <= set(ARCHITECTURES)


def _family_or_none(arch):
    return next((f for p, f in FAMILY_OF_PREFIX.items() if arch.startswith(p)), None)


@pytest.mark.parametrize("arch", SMALLEST)
def test_default_layer_gives_the_last_stage_map(arch, monkeypatch):
    """On the meta device: the default CAM layer of each family outputs a (N, C, h, w) map at
    stride 32 (VGG's relu5: 16; AlexNet's pool5: 6x6), and the composite's map is twice as
    large, as the GC loss needs."""
    from captum_consistency.builders import gradcam_layer_name

    model = _on_meta(arch, monkeypatch)
    family = _family(arch)
    assert detect_architecture(model) == family
    name = default_layers(model)["layer"]
    assert gradcam_layer_name(arch) == name
    layer = model.get_submodule(name)
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[2:])))
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
        model(torch.empty(1, 3, 448, 448, device="meta"))
    handle.remove()
    side = {"vgg": 14, "alexnet": 6}.get(family, 7)
    assert seen[0] == (side, side), arch
    if family != "alexnet":
        assert seen[1] == (2 * side, 2 * side), arch


@pytest.mark.parametrize("arch", [n for n in torchvision.models.list_models(module=torchvision.models)
                                  if n.startswith(("vgg", "vit_"))])
def test_default_layers_read_from_the_model(arch, monkeypatch):
    """VGG's and ViT's default layers are read from each model's modules."""
    model = _on_meta(arch, monkeypatch)
    name = default_layers(model)["layer"]
    if arch.startswith("vgg"):
        assert isinstance(model.get_submodule(name), nn.ReLU)
        assert name == f"features.{len(model.features) - 2}"  # relu5, before pool5
    else:
        last = len(model.encoder.layers) - 1
        assert name == f"encoder.layers.encoder_layer_{last}.ln_1"
