"""Architecture changes of the paper: ResNet with global max pooling (GMP)."""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

__all__ = ["to_global_max_pool"]


def _is_global_avg_pool(module: nn.Module) -> bool:
    if not isinstance(module, nn.AdaptiveAvgPool2d):
        return False
    size = module.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size == (1, 1)


def to_global_max_pool(model: nn.Module) -> nn.Module:
    r"""Replaces the global average pooling before the classifier with global max pooling.

    The "GMP" model of the paper (Pillai & Pirsiavash, AAAI 2021, Sec. 3): global average
    pooling spreads a decision over the whole image, the spatial analogue of Grad-CAM's gradient
    averaging; ``AdaptiveMaxPool2d(1)`` makes the model collect evidence from selective
    locations and gives sharper element-wise Grad-CAM maps. The last ``AdaptiveAvgPool2d`` with
    a 1x1 output (``model.avgpool`` in torchvision ResNets) is replaced in place. Pooling has no
    parameters, so the state dict is unchanged and torchvision weights still load.

    Args:
        model (torch.nn.Module): e.g. ``torchvision.models.resnet50()``.

    Returns:
        The same model object, modified in place.

    Raises:
        ValueError: the model has no global average pooling to 1x1 (e.g. AlexNet, whose
            pooling is to 6x6).

    Examples::

        >>> model = to_global_max_pool(torchvision.models.resnet18(num_classes=10))
        >>> model.avgpool
        AdaptiveMaxPool2d(output_size=1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found: List[Tuple[nn.Module, str]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if _is_global_avg_pool(child):
                found.append((parent, name))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no global average pooling (nn.AdaptiveAvgPool2d to 1x1) "
            "to replace; to_global_max_pool expects a ResNet-like model"
        )
    parent, name = found[-1]  # the one closest to the classifier in module order
    setattr(parent, name, nn.AdaptiveMaxPool2d(1))
    return model
