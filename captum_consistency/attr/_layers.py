"""Layers of a model and class targets: the checks every attribution method shares."""

from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["resolve_layer", "layer_name", "check_layer_in_model"]

#: What the attribution methods of this package accept as inputs and as targets.
Inputs = Union[Tensor, Tuple[Tensor, ...]]
Target = Union[None, int, Sequence[int], Tensor]

# Families of leaf modules, for the methods that give each kind of module its own rule.
_AVG_POOLS = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_MAX_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # identities in eval mode
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)


def layer_name(model: nn.Module, layer: nn.Module, argname: str = "layer") -> str:
    """The name of ``layer`` in ``model`` (``""`` for the model itself).

    Raises:
        ValueError: ``layer`` is not a submodule of ``model``.
    """
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise ValueError(
        f"{argname} ({type(layer).__name__}) is not a submodule of the model "
        f"({type(model).__name__}); pass a module of the model itself, e.g. model.layer4"
    )


def resolve_layer(model: nn.Module, layer: Union[str, nn.Module], argname: str = "layer") -> nn.Module:
    """Returns the submodule of ``model`` given by name (``"layer3"``, ``"features.23"``) or itself.

    Raises:
        TypeError: ``layer`` is neither a string nor a module.
        ValueError: ``layer`` is not a submodule of ``model``.
    """
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            names = [n for n in modules if n]
            preview = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"{argname}={layer!r} is not a submodule of {type(model).__name__}; "
                f"valid names include: {preview}"
            )
        return modules[layer]
    if isinstance(layer, nn.Module):
        layer_name(model, layer, argname)
        return layer
    raise TypeError(
        f"{argname} must be a submodule name (str) or a torch.nn.Module, got {type(layer).__name__}"
    )


def check_layer_in_model(model: Any, layer: nn.Module, argname: str = "layer") -> None:
    """Raises unless ``layer`` is a module, and one of ``model``'s when ``model`` is a ``Module``.

    ``model`` may be any callable (a Captum ``forward_func``); only a ``Module`` is searched.

    Raises:
        TypeError: ``layer`` is not a ``torch.nn.Module``.
        ValueError: ``model`` is a ``Module`` that does not contain ``layer``.
    """
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{argname} must be a torch.nn.Module, got {type(layer).__name__}")
    if isinstance(model, nn.Module):
        layer_name(model, layer, argname)


def _target_tensor(target: Union[int, Sequence[int], Tensor], n: int, device: torch.device) -> Tensor:
    """``(n,)`` int64 class indices from an int, a sequence of ints or an integer tensor."""
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or an integer tensor, got bool")
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=device)
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must have an integer dtype, got {target.dtype}")
        index = target.to(device=device, dtype=torch.long).reshape(-1)
    elif isinstance(target, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in target):
        index = torch.tensor(list(target), dtype=torch.long, device=device)
    else:
        raise TypeError(
            f"target must be an int, a sequence of ints or an integer tensor, got {type(target).__name__}"
        )
    if index.numel() == 1:
        return index.expand(n)
    if index.numel() != n:
        raise ValueError(f"target has {index.numel()} entries for a batch of {n}")
    return index


def _class_index(output: Tensor, target: Target) -> Tensor:
    """``(N,)`` class of each sample: ``target`` checked against ``output``'s classes (dim 1),
    or the predicted class (summed over any spatial dimensions) when ``target`` is ``None``."""
    n, k = output.shape[0], output.shape[1]
    if target is None:
        scores = output.detach().flatten(2).sum(2) if output.dim() > 2 else output.detach()
        return scores.argmax(dim=1)
    index = _target_tensor(target, n, output.device)
    bad = (index < 0) | (index >= k)
    if bool(bad.any()):
        raise ValueError(f"target {index[bad].tolist()} outside the classifier's range [0, {k})")
    return index


class _FrozenParameters:
    """Context manager: ``requires_grad`` off for every parameter of ``model``, restored after."""

    def __init__(self, model: nn.Module) -> None:
        self._flags = {p: p.requires_grad for p in model.parameters()}

    def __enter__(self) -> "_FrozenParameters":
        for p in self._flags:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc: Any) -> None:
        for p, flag in self._flags.items():
            p.requires_grad_(flag)
