"""The excitation rules of contrastive excitation backprop (Zhang et al., ECCV 2016).

Which rule each module type gets, and the custom autograd functions that apply them: identities
on the forward pass whose backward pass is the excitation rule.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from captum_consistency.attr._layers import _AVG_POOLS, _DROPOUTS, _MAX_POOLS, _RESHAPES

#: Added to the positive forward ``sum_k w+_ik x_k`` before dividing, as in TorchRay and the
#: authors' Caffe code, so that a unit with no excitatory input passes nothing back.
EXCITATION_EPS = 1e-20

# Excitation rule: positive weights, no bias, normalised by the layer's own positive forward.
_EXCITATION_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_EXCITATION_POOL = _AVG_POOLS
# Passed through unchanged (batch norm's scaling and shift are ignored, as in the reference).
_PASS_THROUGH = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
# Ordinary gradient: ReLU and max pooling route the signal; the others are identities or reshapes
# in evaluation mode.
_ORDINARY = (nn.ReLU,) + _MAX_POOLS + _DROPOUTS + (nn.AlphaDropout, nn.FeatureAlphaDropout) + _RESHAPES
_RESIDUAL_BLOCKS = (BasicBlock, Bottleneck)


def find_classifier_layer(model: nn.Module) -> nn.Module:
    """The last ``nn.Linear`` or ``nn.Conv{1,2,3}d`` of ``model`` in module registration order."""
    last = None
    for module in model.modules():
        if isinstance(module, _EXCITATION_LINEAR):
            last = module
    if last is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear or nn.Conv layer to use as the classifier; "
            "pass classifier_layer explicitly"
        )
    return last


def _positive_forward(module: nn.Module, weight: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    """``x -> f(x, w+)`` without bias for conv/linear layers, the pooling itself for pools."""
    if isinstance(module, nn.Linear):
        return lambda x: F.linear(x, weight)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return lambda x: module._conv_forward(x, weight, None)
    # ``forward`` (not ``__call__``) so that the hooks installed on the module do not re-enter.
    return module.forward


class _Excitation(torch.autograd.Function):
    r"""Identity on the layer's output; backward ``p' = x * J_{w+}^T (p / (f(x, w+) + eps))``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor, positive: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            z = positive(x_in)
        ctx.save_for_backward(x)  # version-checked: an in-place change of x later is an error
        ctx.x_in, ctx.z = x_in, z
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None]:
        (x,) = ctx.saved_tensors
        z = ctx.z
        (g,) = torch.autograd.grad(z, ctx.x_in, grad / (z.detach() + EXCITATION_EPS), retain_graph=True)
        return g * x, None, None


class _PassThrough(torch.autograd.Function):
    """Identity on the layer's output; backward passes the signal to the input unchanged."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor) -> Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return grad, None


class _ResidualSum(torch.autograd.Function):
    r"""``y = relu(b + i)`` of a residual block; backward splits ``p * [y > 0]`` in proportion
    ``b / (b + i)`` and ``i / (b + i)`` between the residual branch ``b`` and the shortcut ``i``."""

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, branch: Tensor, identity: Tensor, branch_value: Tensor, identity_value: Tensor
    ) -> Tensor:
        total = branch_value + identity_value
        ctx.save_for_backward(branch_value, identity_value, total)
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[None, Tensor, Tensor, None, None]:
        branch_value, identity_value, total = ctx.saved_tensors
        active = total > 0  # the ReLU after the addition
        grad = torch.where(active, grad, torch.zeros_like(grad))
        total = torch.where(active, total, torch.ones_like(total))
        return None, branch_value / total * grad, identity_value / total * grad, None, None

