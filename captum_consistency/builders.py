"""Model builders for the paper's architectures and their Grad-CAM layers.

The paper (Pillai & Pirsiavash, AAAI 2021, Sec. 4.4) trains torchvision's AlexNet, ResNet-18
and ResNet-50, optionally with global max pooling (GMP, ResNets only). The Grad-CAM layer is
the output of the last convolutional block: ``layer4`` for ResNets and the whole ``features``
stack for AlexNet (conv5 after its ReLU and max pooling, as in the authors' code).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torchvision
from torch import nn

from captum_consistency.models import to_global_max_pool

__all__ = ["ARCHITECTURES", "build_model", "gradcam_layer", "gradcam_layer_name", "unwrap_model"]

#: Architectures the recipes can build.
ARCHITECTURES: Tuple[str, ...] = ("resnet18", "resnet50", "alexnet")
"""Architectures that :func:`build_model` (and ``recipes/train.py --arch``) can build."""

_LAYER_NAMES: Dict[str, str] = {"resnet18": "layer4", "resnet50": "layer4", "alexnet": "features"}


def build_model(arch: str, num_classes: int, gmp: bool = False) -> nn.Module:
    """Builds a randomly initialised torchvision classifier (``weights=None``).

    Args:
        arch (str): one of ``"resnet18"``, ``"resnet50"``, ``"alexnet"``.
        num_classes (int): size of the classifier's output (from the data, never hard-coded).
        gmp (bool): replace the global average pooling with global max pooling
            (:func:`captum_consistency.to_global_max_pool`); ResNets only.

    Returns:
        torch.nn.Module: the model, in training mode, on the CPU.

    Raises:
        ValueError: unknown ``arch``, ``num_classes < 1`` or ``gmp`` with AlexNet.

    Examples::

        >>> model = build_model("resnet18", num_classes=10, gmp=True)
        >>> model.avgpool
        AdaptiveMaxPool2d(output_size=1)
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if gmp and not arch.startswith("resnet"):
        raise ValueError(
            f"gmp=True needs a ResNet (global average pooling to replace); {arch} pools to 6x6"
        )
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if gmp:
        to_global_max_pool(model)
    return model


def gradcam_layer_name(arch: str) -> str:
    """Name of the Grad-CAM layer of ``arch``: ``"layer4"`` (ResNets) or ``"features"`` (AlexNet).

    Args:
        arch (str): one of :data:`ARCHITECTURES`.

    Returns:
        str: the attribute name of the layer on the model.

    Raises:
        ValueError: unknown ``arch``.

    Examples::

        >>> gradcam_layer_name("alexnet")
        'features'
    """
    if arch not in _LAYER_NAMES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    return _LAYER_NAMES[arch]


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

    ``model.layer4`` when the model has one (ResNets), else ``model.features`` (AlexNet).

    Args:
        model (torch.nn.Module): a ResNet or AlexNet, possibly wrapped in DDP.

    Returns:
        torch.nn.Module: the layer, a submodule of the unwrapped model.

    Raises:
        ValueError: the model has neither ``layer4`` nor ``features``.

    Examples::

        >>> model = build_model("resnet18", 10)
        >>> gradcam_layer(model) is model.layer4
        True
    """
    inner = unwrap_model(model)
    for name in ("layer4", "features"):
        layer = getattr(inner, name, None)
        if isinstance(layer, nn.Module):
            return layer
    raise ValueError(
        f"cannot find the Grad-CAM layer of {type(inner).__name__}: expected a ResNet "
        "(model.layer4) or AlexNet (model.features)"
    )
