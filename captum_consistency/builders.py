"""Model builders for the recipes' architectures and their Grad-CAM layers.

The paper (Pillai & Pirsiavash, AAAI 2021, Sec. 4.4) trains torchvision's AlexNet, ResNet-18
and ResNet-50, optionally with global max pooling (GMP). The recipes also build every
torchvision model of the ResNet (with ResNeXt and Wide ResNet), VGG, ConvNeXt, EfficientNet,
MobileNetV3, DenseNet and RegNet families: their classifiers pool globally (or, VGG and
AlexNet, adaptively), so they take the ``2S x 2S`` composites of the GC loss. The Grad-CAM layer
is the family's default CAM layer (:func:`captum_consistency.attr.default_layers`): ``layer4``
for ResNets, the whole ``features`` stack for AlexNet (conv5 after its ReLU and max pooling, as
in the authors' code), the last stage for the others. Vision transformers are refused: their
position embeddings are fixed to one input size, so a ViT cannot take a composite twice as
large.

timm models are built by name with ``"timm:<name>"`` (``timm.create_model(name,
pretrained=False)``; timm is optional, ``pip install captum-consistency[timm]``) for the timm
families of the same table: ``timm.models.ResNet``, ``ConvNeXt``, ``EfficientNet`` and
``RegNet``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torchvision
from torch import nn

from captum_consistency.attr._families import (
    TIMM_FAMILIES,
    TIMM_PREFIX,
    default_layers,
    detect_architecture,
    family_of_model_name,
    static_layer_name,
)
from captum_consistency.models import to_global_max_pool

__all__ = [
    "ARCHITECTURES",
    "build_model",
    "gradcam_layer",
    "gradcam_layer_name",
    "unwrap_model",
    "is_timm_arch",
]

#: The families whose models cannot take the GC loss's composites (see ``_VIT_REFUSAL``).
_REFUSED_FAMILIES = ("vit",)

ARCHITECTURES: Tuple[str, ...] = tuple(
    sorted(n for n in torchvision.models.list_models(module=torchvision.models)
           if family_of_model_name(n) not in (None,) + _REFUSED_FAMILIES)
)
"""Architectures that :func:`build_model` (and ``recipes/train.py --arch``) can build: every
torchvision classification model of the ResNet (``resnet*``, ``resnext*``, ``wide_resnet*``),
VGG, AlexNet, ConvNeXt, EfficientNet (B0-B7, V2), MobileNetV3, DenseNet and RegNet families
of :data:`captum_consistency.attr.ARCHITECTURE_FAMILIES` (the families are the registry's; these
are torchvision's model names). timm models are not listed: ``"timm:<name>"`` builds any timm
model of the timm families (:func:`is_timm_arch`)."""

_TIMM_MISSING = (
    "{arch!r} is a timm model and timm is not installed: pip install 'captum-consistency[timm]' "
    "(or pip install timm)"
)


def _import_timm(arch: str):
    try:
        import timm
    except ImportError:
        raise ImportError(_TIMM_MISSING.format(arch=arch)) from None
    return timm


def is_timm_arch(arch: str) -> bool:
    """Whether ``arch`` names a timm model (``"timm:<name>"``, e.g. ``"timm:convnext_atto"``).

    Args:
        arch (str): an architecture name of :func:`build_model`.

    Returns:
        bool: True for the ``timm:`` prefix (whether or not timm knows the name).
    """
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def _build_timm(arch: str, num_classes: int) -> nn.Module:
    timm = _import_timm(arch)
    name = arch[len(TIMM_PREFIX):]
    if not timm.is_model(name):
        raise ValueError(
            f"arch {arch!r}: timm has no model {name!r} (timm.list_models() lists its names)"
        )
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    family = detect_architecture(model)
    if family not in TIMM_FAMILIES:
        raise ValueError(
            f"arch {arch!r}: a {type(model).__module__}.{type(model).__name__}, not one of the timm "
            f"families with default layers ({', '.join(TIMM_FAMILIES)}: timm.models.ResNet, "
            "ConvNeXt, EfficientNet, RegNet)"
        )
    return model

_VIT_REFUSAL = (
    "vision transformers cannot be trained with the GC loss: their position embeddings fix the "
    "input size, so a ViT cannot take the 2S x 2S composite of S x S images (and a composite "
    "resized to S would no longer tile the single image's token map); evaluate a ViT with the "
    "pgc: methods of captum_consistency.attr.get_attribution instead"
)


def build_model(arch: str, num_classes: int, gmp: bool = False) -> nn.Module:
    """Builds a randomly initialised torchvision (or timm) classifier (``weights=None``).

    Args:
        arch (str): one of :data:`ARCHITECTURES` (e.g. ``"resnet18"``, ``"convnext_tiny"``), or
            ``"timm:<name>"`` for a timm model of the ResNet, ConvNeXt, EfficientNet or RegNet
            classes (``timm.create_model(name, pretrained=False)``).
        num_classes (int): size of the classifier's output (from the data, never hard-coded).
        gmp (bool): replace the global average pooling with global max pooling
            (:func:`captum_consistency.to_global_max_pool`): ResNet, ConvNeXt, EfficientNet,
            MobileNetV3 and RegNet; VGG and AlexNet pool to 7x7 / 6x6 and DenseNet pools inside
            ``forward()``, so they are refused.

    Returns:
        torch.nn.Module: the model, in training mode, on the CPU.

    Raises:
        ValueError: unknown ``arch`` (a ViT with the reason; a timm name timm does not know or
            of another class), ``num_classes < 1``, or ``gmp`` with a model without a global
            average pooling module.
        ImportError: a ``timm:`` name without timm installed.

    Examples::

        >>> model = build_model("resnet18", num_classes=10, gmp=True)
        >>> model.avgpool
        AdaptiveMaxPool2d(output_size=1)
    """
    if not is_timm_arch(arch):
        _check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if is_timm_arch(arch):
        model = _build_timm(arch, num_classes)
    elif arch.startswith("regnet_") and torch.get_default_device().type == "meta":
        # RegNet's builder computes its stage widths with tensor operations, which the meta
        # device cannot run (size checks build models there): build on the CPU, then move.
        with torch.device("cpu"):
            model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        model = model.to("meta")
    else:
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if gmp:
        try:
            to_global_max_pool(model)
        except ValueError as error:
            raise ValueError(f"gmp=True needs a global average pooling to replace: {error}") from None
    return model


def _check_arch(arch: str) -> None:
    if arch in ARCHITECTURES:
        return
    if isinstance(arch, str) and family_of_model_name(arch) in _REFUSED_FAMILIES:
        raise ValueError(f"arch {arch!r}: {_VIT_REFUSAL}")
    raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")


def gradcam_layer_name(arch: str) -> str:
    """Name of the Grad-CAM layer of ``arch`` (:func:`captum_consistency.attr.default_layers`).

    ``"layer4"`` for ResNets, ``"features"`` for AlexNet, ConvNeXt, EfficientNet and
    MobileNetV3, the last ReLU of ``features`` for VGG, ``"features.denseblock4"`` for DenseNet
    and ``"trunk_output"`` for RegNet.

    Args:
        arch (str): one of :data:`ARCHITECTURES`, or ``"timm:<name>"`` (``"layer4"``,
            ``"stages"``, ``"bn2"`` or ``"final_conv"`` for timm's ResNet, ConvNeXt,
            EfficientNet and RegNet).

    Returns:
        str: the name of the layer in ``model.named_modules()`` (for ``model.get_submodule``).

    Raises:
        ValueError: unknown ``arch``.

    Examples::

        >>> gradcam_layer_name("alexnet")
        'features'
        >>> gradcam_layer_name("vgg16")
        'features.29'
    """
    if is_timm_arch(arch):
        with torch.device("meta"):
            return default_layers(_build_timm(arch, 1))["layer"]
    _check_arch(arch)
    family = family_of_model_name(arch)
    name = static_layer_name(family)
    if name is not None:
        return name
    with torch.device("meta"):  # module names only: no memory, no initialisation cost
        model = getattr(torchvision.models, arch)(weights=None)
    return default_layers(model, family)["layer"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Returns the module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers.

    Args:
        model (torch.nn.Module): a model, wrapped or not.

    Returns:
        torch.nn.Module: the innermost module (``model`` itself when it is not wrapped).

    Examples::


        >>> unwrap_model(DistributedDataParallel(net)) is net
        True
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The Grad-CAM layer of a model built by :func:`build_model` (wrappers are looked through).

    The family's default CAM layer (:func:`captum_consistency.attr.default_layers`); for a model
    of no torchvision family, ``model.layer4`` or else ``model.features`` when it has one.

    Args:
        model (torch.nn.Module): a model of :data:`ARCHITECTURES`, possibly wrapped in DDP.

    Returns:
        torch.nn.Module: the layer, a submodule of the unwrapped model.

    Raises:
        ValueError: a vision transformer (refused: see :func:`build_model`), or a model of no
            known family with neither ``layer4`` nor ``features``.

    Examples::

        >>> model = build_model("resnet18", 10)
        >>> gradcam_layer(model) is model.layer4
        True
    """
    inner = unwrap_model(model)
    arch = detect_architecture(inner)
    if arch == "vit":
        raise ValueError(f"no Grad-CAM layer for the GC loss: {_VIT_REFUSAL}")
    if arch is not None:
        return inner.get_submodule(default_layers(inner, arch)["layer"])
    for name in ("layer4", "features"):
        layer = getattr(inner, name, None)
        if isinstance(layer, nn.Module):
            return layer
    raise ValueError(
        f"cannot find the Grad-CAM layer of {type(inner).__name__}: not a torchvision family of "
        "captum_consistency.attr.default_layers, and no model.layer4 or model.features; pass the "
        "layer to GradCamConsistencyLoss explicitly"
    )
