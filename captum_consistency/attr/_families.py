"""Architecture families: the torchvision and timm classes, their model names and default layers.

One table, :data:`_FAMILIES`, says for each family which torchvision (or timm) class it is (for
:func:`detect_architecture`), which ``torchvision.models`` builder names belong to it (for
:data:`captum_consistency.builders.ARCHITECTURES` and the display names of the reports) and
which layers the registry and the GC loss use (:func:`default_layers`,
:func:`captum_consistency.builders.gradcam_layer_name`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

from torch import nn
from torchvision.models import (
    VGG,
    AlexNet,
    ConvNeXt,
    DenseNet,
    EfficientNet,
    MobileNetV3,
    RegNet,
    ResNet,
    VisionTransformer,
)

from captum_consistency.attr._layers import resolve_layer

__all__ = [
    "ARCHITECTURE_FAMILIES",
    "detect_architecture",
    "default_layers",
    "family_of_model_name",
    "display_name",
]

#: A layer name, or a function of the model that reads it from the model's modules.
_LayerName = Union[str, Callable[[nn.Module], str]]


def _last(container: str, kind: type, from_end: int = 1) -> Callable[[nn.Module], str]:
    """The name of the ``from_end``-th last module of type ``kind`` inside ``model.<container>``."""

    def name(model: nn.Module) -> str:
        parent = resolve_layer(model, container, container)
        found = [n for n, m in parent.named_modules() if isinstance(m, kind)]
        if len(found) < from_end:
            raise ValueError(f"{container} has fewer than {from_end} {kind.__name__} modules")
        return f"{container}.{found[-from_end]}"

    return name


def _vit_layer(model: nn.Module) -> str:
    blocks = resolve_layer(model, "encoder.layers", "encoder.layers")
    last = list(blocks.named_children())[-1][0]
    return f"encoder.layers.{last}.ln_1"


@dataclass(frozen=True)
class _Family:
    # The torchvision class (subclasses count), or "module:Class" of an optional library
    # (timm), looked up only once that module is imported: a timm model exists only then.
    cls: Union[type, str]
    names: Mapping[str, str]  # builder-name prefix -> its display form ("resnet" -> "ResNet")
    layers: Mapping[str, _LayerName]  # role -> layer ("layer": the CAM layer; cMWP's three)

    def matches(self, model: nn.Module) -> bool:
        cls = self.cls
        if isinstance(cls, str):
            module, _, name = cls.partition(":")
            cls = getattr(sys.modules.get(module), name, None)
            if cls is None:
                return False
        return isinstance(model, cls)


# cMWP's layers of VGG and AlexNet: pool4 / pool2 (the second-to-last max pool of features),
# relu7 (the last ReLU of the classifier) and the last Linear; the CAM layer differs.
_CMWP_VGG_LIKE: Dict[str, _LayerName] = {
    "saliency_layer": _last("features", nn.MaxPool2d, from_end=2),
    "contrast_layer": _last("classifier", nn.ReLU),
    "classifier_layer": _last("classifier", nn.Linear),
}

#: The prefix of timm model names in :func:`captum_consistency.builders.build_model` and the
#: recipes' ``--arch`` (``"timm:resnet18"``).
TIMM_PREFIX = "timm:"

#: The timm families (classes of ``timm.models``) with default layers.
TIMM_FAMILIES: Tuple[str, ...] = ("timm-resnet", "timm-convnext", "timm-efficientnet", "timm-regnet")

_FAMILIES: Dict[str, _Family] = {
    "resnet": _Family(
        ResNet, {"resnet": "ResNet", "resnext": "ResNeXt", "wide_resnet": "Wide-ResNet"},
        {"layer": "layer4", "saliency_layer": "layer3", "contrast_layer": "avgpool",
         "classifier_layer": "fc"}),
    "vgg": _Family(VGG, {"vgg": "VGG"},
                   {"layer": _last("features", nn.ReLU), **_CMWP_VGG_LIKE}),  # relu5, before pool5
    "alexnet": _Family(AlexNet, {"alexnet": "AlexNet"}, {"layer": "features", **_CMWP_VGG_LIKE}),
    "convnext": _Family(ConvNeXt, {"convnext_": "ConvNeXt-"}, {"layer": "features"}),
    "efficientnet": _Family(EfficientNet, {"efficientnet_": "EfficientNet-"}, {"layer": "features"}),
    "mobilenetv3": _Family(MobileNetV3, {"mobilenet_v3_": "MobileNetV3-"}, {"layer": "features"}),
    "densenet": _Family(DenseNet, {"densenet": "DenseNet"}, {"layer": "features.denseblock4"}),
    "regnet": _Family(RegNet, {"regnet_": "RegNet-"}, {"layer": "trunk_output"}),
    "vit": _Family(VisionTransformer, {"vit_": "ViT-"}, {"layer": _vit_layer}),
    # timm's classes (``timm.create_model(name)``; the recipes' ``--arch timm:NAME``). Their
    # names are timm's, so the family is read from the class, never from the name.
    "timm-resnet": _Family(
        "timm.models.resnet:ResNet", {},
        {"layer": "layer4", "saliency_layer": "layer3", "contrast_layer": "global_pool",
         "classifier_layer": "fc"}),
    "timm-convnext": _Family("timm.models.convnext:ConvNeXt", {}, {"layer": "stages"}),
    # conv_head + bn2 (BatchNormAct2d: norm and activation), the output of the last stage
    "timm-efficientnet": _Family("timm.models.efficientnet:EfficientNet", {}, {"layer": "bn2"}),
    # final_conv: an Identity after stage s4 in most RegNets, a 1x1 convolution in the others
    "timm-regnet": _Family("timm.models.regnet:RegNet", {}, {"layer": "final_conv"}),
}

ARCHITECTURE_FAMILIES: Tuple[str, ...] = tuple(_FAMILIES)
"""The architecture families with default layers, as
:func:`~captum_consistency.attr.detect_architecture` names them: torchvision's ``resnet`` (with
ResNeXt and Wide ResNet), ``vgg``, ``alexnet``, ``convnext``, ``efficientnet`` (with V2),
``mobilenetv3``, ``densenet``, ``regnet`` and ``vit``, and timm's ``timm-resnet`` (every model
of ``timm.models.ResNet``: ResNet, ResNet-D, ResNeXt, SE-ResNet, ...), ``timm-convnext``,
``timm-efficientnet`` (EfficientNet, MixNet, MobileNetV2, ... of ``timm.models.EfficientNet``)
and ``timm-regnet`` (timm is optional: ``pip install captum-consistency[timm]``). Not to be confused with
:data:`captum_consistency.builders.ARCHITECTURES`, the model names the recipes build."""

#: The families cMWP has default layers for: the ReLU networks its excitation rules cover.
CMWP_FAMILIES: Tuple[str, ...] = tuple(f for f, v in _FAMILIES.items() if "saliency_layer" in v.layers)


def _check_family(arch: str) -> _Family:
    if arch not in _FAMILIES:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHITECTURE_FAMILIES)}")
    return _FAMILIES[arch]


def detect_architecture(model: nn.Module) -> Optional[str]:
    """The torchvision family of ``model`` (one of :data:`ARCHITECTURE_FAMILIES`), or ``None``.

    Args:
        model (torch.nn.Module): the model; subclasses of torchvision's classes count.

    Returns:
        str or None: e.g. ``"resnet"`` for ``resnet50`` or ``resnext50_32x4d``.

    Examples::

        >>> detect_architecture(torchvision.models.convnext_tiny())
        'convnext'
    """
    for arch, family in _FAMILIES.items():
        if family.matches(model):
            return arch
    return None


def family_of_model_name(name: str) -> Optional[str]:
    """The family of a ``torchvision.models`` builder name (``"resnext50_32x4d"`` -> ``"resnet"``),
    or ``None`` for a model of no family. A timm name (``"timm:..."``) has its family in its
    class, not its name: ``None`` as well (build it and use :func:`detect_architecture`)."""
    if name.startswith(TIMM_PREFIX):
        return None
    for arch, family in _FAMILIES.items():
        if name.startswith(tuple(family.names)):
            return arch
    return None


def display_name(name: str) -> str:
    """A builder name as reports show it: ``"resnet18"`` -> ``"ResNet18"``, ``"alexnet"`` ->
    ``"AlexNet"``, ``"convnext_tiny"`` -> ``"ConvNeXt-tiny"``; other names unchanged."""
    arch = family_of_model_name(name)
    if arch is None:
        return name
    prefix = max((p for p in _FAMILIES[arch].names if name.startswith(p)), key=len)
    return _FAMILIES[arch].names[prefix] + name[len(prefix):]


def static_layer_name(arch: str, role: str = "layer") -> Optional[str]:
    """The default layer of ``role`` of family ``arch`` when it does not depend on the model's
    depth (``None`` for VGG's and ViT's CAM layers, read from each model)."""
    layer = _check_family(arch).layers.get(role)
    return layer if isinstance(layer, str) else None


def default_layers(model: nn.Module, arch: Optional[str] = None) -> Dict[str, str]:
    r"""The default layers of each architecture family, by role.

    ``layer`` is the CAM layer (Grad-CAM, the ``pgc:`` CAMs, Captum's ``LayerGradCam`` and
    ``GuidedGradCam``): the output of the last convolutional stage, where the GC loss
    regularises the map.

    - ``resnet``: ``layer4``; cMWP saliency at ``layer3``, contrast at ``avgpool`` (the pooled
      features), classifier ``fc``.
    - ``vgg``: the last ReLU of ``features`` (relu5, before pool5); cMWP saliency at pool4 (the
      second-to-last max pool of ``features``), contrast at relu7 (the last ReLU of
      ``classifier``), classifier its last ``Linear``.
    - ``alexnet``: ``features`` (conv5 after its ReLU and pool5, 6x6 at 224 px, the layer the
      GC loss regularises in the authors' code); cMWP saliency at pool2, contrast at relu7,
      classifier the last ``Linear``.
    - ``convnext``, ``efficientnet``, ``mobilenetv3``: ``features`` (the last stage; for
      EfficientNet and MobileNetV3 its final 1x1 convolution block).
    - ``densenet``: ``features.denseblock4``. Not ``features``: ``DenseNet.forward`` applies
      ``F.relu(..., inplace=True)`` to the output of ``features`` (= ``norm5``), which
      overwrites activations that hooks have recorded, differently on the CPU (shared
      storage) and the GPU (copied) in pytorch-grad-cam.
    - ``regnet``: ``trunk_output``.
    - ``vit``: ``ln_1`` of the last encoder block (pytorch-grad-cam's choice for vision
      transformers): the last block's output reaches the classifier through the class token
      only, so its patch tokens have no gradient.
    - ``timm-resnet``: ``layer4``; cMWP as torchvision's ResNet, contrast at ``global_pool``.
    - ``timm-convnext``: ``stages`` (the last stage's output, before the head's pooling and
      norm).
    - ``timm-efficientnet``: ``bn2`` (the head's 1x1 convolution after its norm and
      activation, as torchvision's ``features``).
    - ``timm-regnet``: ``final_conv`` (after the last stage ``s4``; an identity in most
      RegNets).

    For VGG-16 the cMWP layers are ``features.23``, ``classifier.4`` and ``classifier.6``, those
    of TorchRay's pointing-game benchmark. cMWP has defaults for ``resnet``, ``vgg`` and
    ``alexnet`` only, the ReLU networks its excitation rules cover.

    Args:
        model (torch.nn.Module): the model (module names are read from it).
        arch (str, optional): one of :data:`ARCHITECTURE_FAMILIES`; ``None``: detected from the
            model.

    Returns:
        dict with the name of ``layer`` and, for the ResNets, VGG and AlexNet, of
        ``saliency_layer``, ``contrast_layer`` and ``classifier_layer`` (cMWP).

    Raises:
        ValueError: an unknown ``arch``, or a model of no known family.

    Examples::

        >>> default_layers(torchvision.models.vgg16())["saliency_layer"]
        'features.23'
        >>> default_layers(torchvision.models.densenet121())
        {'layer': 'features.denseblock4'}
    """
    if arch is None:
        arch = detect_architecture(model)
        if arch is None:
            raise ValueError(
                f"no default layers for {type(model).__name__}; known families (torchvision, timm): "
                f"{', '.join(ARCHITECTURE_FAMILIES)}"
            )
    layers = _check_family(arch).layers
    return {role: layer if isinstance(layer, str) else layer(model) for role, layer in layers.items()}
