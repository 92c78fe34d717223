"""get_attribution: per-architecture layers, uniform output, equality with the direct classes."""

import pytest
import torch
import torchvision
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from captum_consistency import to_global_max_pool
from captum_consistency.attr import (
    ContrastiveExcitationBackprop,
    FullGrad,
    LayerElementwiseGradCam,
    available_attributions,
    get_attribution,
)

NAMES = ["gradcam", "elementwise-gradcam", "cmwp", "fullgrad"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "resnet": torchvision.models.resnet18(weights=None, num_classes=10).eval(),
        "vgg": torchvision.models.vgg11(weights=None, num_classes=10).eval(),
        "alexnet": torchvision.models.alexnet(weights=None, num_classes=10).eval(),
    }


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


EXPECTED_LAYERS = {
    ("resnet", "gradcam"): {"layer": "layer4"},
    ("resnet", "cmwp"): {"layer": "layer3", "contrast_layer": "avgpool", "classifier_layer": "fc"},
    ("vgg", "gradcam"): {"layer": "features.19"},  # relu5_2, before pool5
    ("vgg", "cmwp"): {"layer": "features.15", "contrast_layer": "classifier.4", "classifier_layer": "classifier.6"},
    ("alexnet", "gradcam"): {"layer": "features"},  # pool5 output, as the GC loss in training
    ("alexnet", "cmwp"): {"layer": "features.5", "contrast_layer": "classifier.5", "classifier_layer": "classifier.6"},
}
SHAPES = {
    ("resnet", "gradcam"): (2, 2),
    ("resnet", "cmwp"): (4, 4),
    ("vgg", "gradcam"): (4, 4),
    ("vgg", "cmwp"): (4, 4),
    ("alexnet", "gradcam"): (1, 1),
    ("alexnet", "cmwp"): (3, 3),
}


@pytest.mark.parametrize("arch", ["resnet", "vgg", "alexnet"])
def test_every_method_every_arch(models, x, arch):
    model = models[arch]
    assert available_attributions()[:4] == NAMES
    assert available_attributions("captum-consistency") == NAMES
    for name in NAMES:
        method = get_attribution(name, model)
        native = method.attribute(x, [1, 7], upsample=False)
        sal = method.attribute(x, [1, 7])
        assert method.arch == arch and method.num_classes == 10
        key = (arch, "gradcam" if name == "elementwise-gradcam" else name)
        size = SHAPES.get(key, (64, 64))
        assert native.shape == (2, 1) + size, (name, native.shape)
        assert not sal.requires_grad and (sal >= 0).all() and (sal > 0).any(), name
        assert method.layers == EXPECTED_LAYERS.get(key, {})
        # at the input size by default: the layer map upsampled bilinearly (Captum's interpolate)
        assert sal.shape == (2, 1, 64, 64)
        torch.testing.assert_close(sal, LayerAttribution.interpolate(native, (64, 64), "bilinear"))


def test_same_as_the_classes_it_configures(models, x):
    model = models["resnet"]
    target = torch.tensor([3, 4])
    torch.testing.assert_close(
        get_attribution("gradcam", model).attribute(x, target, upsample=False),
        LayerGradCam(model, model.layer4).attribute(x, target, relu_attributions=True).detach(),
    )
    torch.testing.assert_close(
        get_attribution("Elementwise_GradCAM", model).attribute(x, target, upsample=False),
        LayerElementwiseGradCam(model, model.layer4).attribute(x, target, relu_attributions=True).detach(),
    )
    torch.testing.assert_close(
        get_attribution("cmwp", model).attribute(x, target, upsample=False),
        ContrastiveExcitationBackprop(model, model.layer3, model.avgpool, model.fc).attribute(x, target),
    )
    torch.testing.assert_close(
        get_attribution("fullgrad", model).attribute(x, target), FullGrad(model).attribute(x, target)
    )
    # target None: the predicted class (resolved by the registry for Captum's Grad-CAMs; cmwp
    # and fullgrad resolve it themselves, tested in their own files)
    with torch.no_grad():
        pred = model(x).argmax(1)
    for name in ("gradcam", "elementwise-gradcam"):
        method = get_attribution(name, model)
        torch.testing.assert_close(method.attribute(x), method.attribute(x, pred))


def test_vgg16_defaults_are_torchrays_benchmark_layers():
    with torch.device("meta"):  # only the module names are needed
        model = torchvision.models.vgg16()
    assert get_attribution("cmwp", model).layers == {
        "layer": "features.23",  # pool4
        "contrast_layer": "classifier.4",  # relu7
        "classifier_layer": "classifier.6",
    }
    assert get_attribution("gradcam", model).layers == {"layer": "features.29"}


def test_overrides_and_gmp(models, x):
    model = to_global_max_pool(torchvision.models.resnet18(weights=None, num_classes=10).eval())
    sal = get_attribution("cmwp", model).attribute(x, 3, upsample=False)
    assert sal.shape == (2, 1, 4, 4) and (sal >= 0).all()
    method = get_attribution("gradcam", models["resnet"], layer="layer3")
    assert method.layers == {"layer": "layer3"}
    assert method.attribute(x, 3, upsample=False).shape == (2, 1, 4, 4)
    # a model with ResNet module names but another class, with arch=
    class MyResNet(nn.Module):
        forward = torchvision.models.ResNet._forward_impl

        def __init__(self, base):
            super().__init__()
            for name, child in base.named_children():
                self.add_module(name, child)

    wrapped = MyResNet(model)
    with pytest.raises(ValueError, match="cmwp has default layers for resnet, vgg, alexnet.*for MyResNet pass layer="):
        get_attribution("cmwp", wrapped)
    method = get_attribution("cmwp", wrapped, arch="resnet")
    torch.testing.assert_close(method.attribute(x, 3), get_attribution("cmwp", model).attribute(x, 3))


def test_errors(models, x):
    model = models["resnet"]
    with pytest.raises(ValueError, match="unknown attribution 'lime'; valid: gradcam, elementwise-gradcam, cmwp, fullgrad, captum:saliency, .*pgc:gradcam, .*pgc:ablationcam"):
        get_attribution("lime", model)
    with pytest.raises(ValueError, match="gradcam needs a target layer and Sequential is not a torchvision family.*pass layer="):
        get_attribution("gradcam", nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)))
    with pytest.raises(ValueError, match="unknown arch 'swin'; valid: resnet, vgg, alexnet, convnext, efficientnet, mobilenetv3, densenet, regnet, vit"):
        get_attribution("gradcam", model, arch="swin")
    with pytest.raises(ValueError, match="layer='layer9' is not a submodule"):
        get_attribution("gradcam", model, layer="layer9")
    with pytest.raises(ValueError, match="contrast_layer.*not a submodule"):
        get_attribution("cmwp", model, contrast_layer=nn.AdaptiveAvgPool2d(1))
    with pytest.raises(TypeError, match="name must be a str"):
        get_attribution(None, model)
    for name in NAMES:
        method = get_attribution(name, model)
        with pytest.raises(ValueError, match=r"outside the classifier's range \[0, 10\)"):
            method.attribute(x, [0, 10])
        with pytest.raises(ValueError, match="outside"):
            method.attribute(x, -1)


@pytest.mark.parametrize("arch", ["resnet", "alexnet"])
def test_empty_batch_gives_empty_maps_for_every_method(models, x, arch):
    model = models[arch]
    empty = x[:0]
    for name in NAMES:
        method = get_attribution(name, model)
        full = method.attribute(x, target=1)
        for target in (None, 1, torch.zeros(0, dtype=torch.long)):
            out = method.attribute(empty, target=target)
            assert out.shape == (0,) + tuple(full.shape[1:]), (name, target)
