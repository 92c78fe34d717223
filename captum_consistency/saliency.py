"""Small helpers shared by attributions, the GC loss and the metrics."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalize_saliency", "DEFAULT_EPS"]

#: The authors' normaliser: ``m / (m.sum() + 1e-8)``.
DEFAULT_EPS = 1e-8


def normalize_saliency(saliency: Tensor, eps: float = DEFAULT_EPS, *, check: bool = True) -> Tensor:
    r"""Normalises each sample's map to sum to one: ``m / (m.sum() + eps)``.

    This is ``g_x^y = gcam^y / |gcam^y|_1`` of the paper (maps are non-negative after the ReLU
    of Eq. 3). An all-zero map, common early in training when the ReLU kills every location,
    stays all-zero: the result is never NaN, and it is differentiable everywhere.

    A map with negative values is refused: its sum can be near zero while its values are not,
    and the quotient explodes (a signed map such as Captum's ``LayerGradCam`` with the default
    ``relu_attributions=False`` gives values of about 1e8). Apply the ReLU first
    (``relu_attributions=True``, or ``saliency.clamp(min=0)``), as the metrics require too.

    Args:
        saliency (Tensor): ``(N, ...)`` non-negative maps; every dimension after the first is
            summed per sample.
        eps (float): added to the denominator; must be positive.
        check (bool): check the sign (one host-device synchronisation on an accelerator).
            Callers whose maps are non-negative by construction (the output of a ReLU) may
            pass ``False`` to keep a training step free of synchronisations.

    Returns:
        Tensor of the same shape whose samples sum to one (or are all zero).

    Raises:
        ValueError: ``saliency`` is not ``(N, ...)``, ``eps <= 0``, or (with ``check``)
            ``saliency`` has negative values; the message gives the minimum. NaN values are
            not refused: they propagate, as in any arithmetic.

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
    if check and saliency.numel():
        minimum = saliency.detach().amin()
        if bool(minimum < 0):  # NaN passes: a diverged training step reports non-finite losses
            raise ValueError(
                "saliency must be non-negative (apply a ReLU first, e.g. relu_attributions=True "
                f"or saliency.clamp(min=0)), got a minimum of {float(minimum):.4g}"
            )
    total = saliency.flatten(1).sum(dim=1).view(-1, *([1] * (saliency.dim() - 1)))
    return saliency / (total + eps)
