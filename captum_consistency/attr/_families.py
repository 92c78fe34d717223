"""Architecture families: the torchvision classes, their model names and their default layers.

One table, :data:`_FAMILIES`, says for each family which torchvision class it is (for
:func:`detect_architecture`), which ``torchvision.models`` builder names belong to it (for
:data:`captum_consistency.builders.ARCHITECTURES` and the display names of the reports) and
which layers the registry and the GC loss use (:func:`default_layers`,
:func:`captum_consistency.builders.gradcam_layer_name`).
"""

from __future__ import annotations

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
    cls: type  # the torchvision class (subclasses count)
    names: Mapping[str, str]  # builder-name prefix -> its display form ("resnet" -> "ResNet")
    layers: Mapping[str, _LayerName]  # role -> layer ("layer": the CAM layer; cMWP's three)


# cMWP's layers of VGG and AlexNet: pool4 / pool2 (the second-to-last max pool of features),
# relu7 (the last ReLU of the classifier) and the last Linear; the CAM layer differs.
_CMWP_VGG_LIKE: Dict[str, _LayerName] = {
    "saliency_layer": _last("features", nn.MaxPool2d, from_end=2),
    "contrast_layer": _last("classifier", nn.ReLU),
    "classifier_layer": _last("classifier", nn.Linear),
}

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
}

ARCHITECTURE_FAMILIES: Tuple[str, ...] = tuple(_FAMILIES)
"""The torchvision architecture families with default layers, as
:func:`~captum_consistency.attr.detect_architecture` names them: ``resnet`` (with ResNeXt and
Wide ResNet), ``vgg``, ``alexnet``, ``convnext``, ``efficientnet`` (with V2), ``mobilenetv3``,
``densenet``, ``regnet`` and ``vit``. Not to be confused with
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
        if isinstance(model, family.cls):
            return arch
    return None


def family_of_model_name(name: str) -> Optional[str]:
    """The family of a ``torchvision.models`` builder name (``"resnext50_32x4d"`` -> ``"resnet"``),
    or ``None`` for a model of no family."""
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

    For VGG-16 the cMWP layers are ``features.23``, ``classifier.4`` and ``classifier.6``, those
    of TorchRay's pointing-game benchmark. cMWP has defaults for ``resnet``, ``vgg`` and
    ``alexnet`` only, the ReLU networks its excitation rules cover.

    Args:
        model (torch.nn.Module): the model (module names are read from it).
        arch (str, optional): one of :data:`ARCHITECTURE_FAMILIES`; ``None``: detected from the
            model.

    Returns:
        dict with the name of ``layer`` and, for ResNet, VGG and AlexNet, of
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
                f"no default layers for {type(model).__name__}; known torchvision families: "
                f"{', '.join(ARCHITECTURE_FAMILIES)}"
            )
    layers = _check_family(arch).layers
    return {role: layer if isinstance(layer, str) else layer(model) for role, layer in layers.items()}
