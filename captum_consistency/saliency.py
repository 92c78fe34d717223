"""Small helpers shared by attributions, the GC loss and the metrics."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalize_saliency", "DEFAULT_EPS"]

#: The authors' normaliser: ``m / (m.sum() + 1e-8)``.
DEFAULT_EPS = 1e-8


def normalize_saliency(saliency: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    r"""Normalises each sample's map to sum to one: ``m / (m.sum() + eps)``.

    This is ``g_x^y = gcam^y / |gcam^y|_1`` of the paper (maps are non-negative after the ReLU
    of Eq. 3). An all-zero map, common early in training when the ReLU kills every location,
    stays all-zero: the result is never NaN, and it is differentiable everywhere.

    Args:
        saliency (Tensor): ``(N, ...)``; every dimension after the first is summed per sample.
        eps (float): added to the denominator; must be positive.

    Returns:
        Tensor of the same shape whose samples sum to one (or are all zero).

    Examples::

        >>> m = torch.tensor([[[1.0, 3.0]], [[0.0, 0.0]]])
        >>> normalize_saliency(m)
        tensor([[[0.2500, 0.7500]],
                [[0.0000, 0.0000]]])
    """
    if not isinstance(saliency, Tensor) or saliency.dim() < 2:
        raise ValueError(
            f"saliency must be a tensor of shape (N, ...), got {getattr(saliency, 'shape', saliency)}"
        )
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    total = saliency.flatten(1).sum(dim=1).view(-1, *([1] * (saliency.dim() - 1)))
    return saliency / (total + eps)
