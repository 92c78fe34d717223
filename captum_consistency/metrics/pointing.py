"""The pointing games of the paper (Sec. 4.3): PG (Zhang et al. 2016) and SPG, batched.

Both test points of a saliency map against a dilated object mask exactly, with no loop over
samples or pixels (see ``metrics._functional`` for how). They run under ``torch.no_grad()``;
degenerate samples (an all-zero map or an empty mask) score ``NaN``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from captum_consistency.metrics._functional import (
    _check_positive_int,
    _check_tolerance,
    _prepare_pairs,
    _score_images,
)

__all__ = ["pointing_game", "stochastic_pointing_game"]


@torch.no_grad()
def pointing_game(saliency: Tensor, masks: Tensor, tolerance: float = 15) -> Tensor:
    r"""Pointing Game (Zhang et al. 2016) with a tolerance margin, one result per sample.

    A sample is a *hit* when the saliency map's maximum lies within ``tolerance`` pixels of the
    object, that is when some mask pixel is at Euclidean distance strictly less than
    ``tolerance`` from the maximum:

    $$
    \mathrm{hit}(m, M) = \mathbb{1}\Big[\exists (x, y) \in M :\;
        (x - u^\star)^2 + (y - v^\star)^2 < t^2\Big],
    \qquad (u^\star, v^\star) = \arg\max_{(u, v)} m(u, v).
    $$

    This is the test of TorchRay's ``PointingGame.evaluate`` and of the paper's evaluation
    (Sec. 4.3: "we dilate the object mask ... by a margin of 15 pixels"), computed exactly for
    the whole batch. On ties, the first maximum in row-major order is used (as
    ``torch.argmax``). Accuracy is ``#hits / (#hits + #misses)``; the paper averages it per
    class, see [`InterpretationMetrics`][captum_consistency.metrics.InterpretationMetrics].

    Args:
        saliency (Tensor): ``(N, H, W)`` or ``(N, 1, H, W)`` non-negative maps, already at the
            masks' resolution (see [`resize_saliency`][captum_consistency.metrics.resize_saliency]).
        masks (Tensor): boolean ``(N, H, W)`` object masks (see
            [`boxes_to_mask`][captum_consistency.metrics.boxes_to_mask] for boxes).
        tolerance (float): the margin ``t`` in pixels; the paper uses 15 at 224x224.

    Returns:
        Tensor: ``(N,)`` of the saliency's floating dtype: 1.0 for a hit, 0.0 for a miss,
            NaN for a degenerate sample (all-zero map or empty mask), whose maximum is
            meaningless.

    Raises:
        ValueError: negative or NaN ``saliency``, a non-boolean ``masks`` or mismatched shapes.

    Examples:
        >>> saliency = torch.zeros(2, 64, 64)
        >>> saliency[0, 10, 10] = saliency[1, 50, 50] = 1.0
        >>> masks = torch.zeros(2, 64, 64, dtype=torch.bool)
        >>> masks[:, 20:30, 20:30] = True
        >>> pointing_game(saliency, masks)  # (10, 10) is 10*sqrt(2) < 15 px from (20, 20)
        tensor([1., 0.])
    """
    tolerance = _check_tolerance(tolerance)
    maps, totals, masks = _prepare_pairs(saliency, masks)
    return _score_images(maps, totals, masks, tolerance, 0, 0, None, ch=False).pg


@torch.no_grad()
def stochastic_pointing_game(
    saliency: Tensor,
    masks: Tensor,
    tolerance: float = 15,
    num_samples: int = 100,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Stochastic Pointing Game (SPG, Pillai & Pirsiavash 2021, Sec. 4.3), one value per sample.

    The map normalised to sum one is a distribution over pixels; ``S = num_samples`` locations
    are drawn from it with replacement and each is tested like the
    [`pointing_game`][captum_consistency.metrics.pointing_game]:

    $$
    \mathrm{SPG}(m, M) = \frac{1}{S} \sum_{s=1}^{S} \mathbb{1}\Big[\exists (x, y) \in M :
        (x - u_s)^2 + (y - v_s)^2 < t^2\Big],
    \qquad (u_s, v_s) \sim \frac{m}{\sum m}.
    $$

    Its expectation is the map's mass within ``tolerance`` of the object. The paper reports the
    mean and standard deviation over 5 runs (different draws), which
    [`InterpretationMetrics`][captum_consistency.metrics.InterpretationMetrics] does.
    Invariant to scaling the map by a positive constant; with a one-hot map it equals the
    pointing game.

    Args:
        saliency (Tensor): ``(N, H, W)`` or ``(N, 1, H, W)`` non-negative maps.
        masks (Tensor): boolean ``(N, H, W)`` object masks.
        tolerance (float): margin ``t`` in pixels (15 in the paper).
        num_samples (int): locations drawn per map (100 in the paper).
        generator (torch.Generator, optional): source of the draws, on the saliency's device.

    Returns:
        Tensor: ``(N,)`` fractions in ``[0, 1]`` (multiples of ``1 / num_samples``); NaN for
            a degenerate sample (all-zero map or empty mask).

    Raises:
        ValueError: negative or NaN ``saliency``, a non-boolean ``masks``, mismatched shapes,
            or a ``generator`` on another device.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> saliency = torch.rand(8, 224, 224)
        >>> masks = torch.zeros(8, 224, 224, dtype=torch.bool)
        >>> masks[:, 50:150, 50:150] = True
        >>> spg = stochastic_pointing_game(saliency, masks, generator=g)  # about 0.32 each
    """
    tolerance = _check_tolerance(tolerance)
    num_samples = _check_positive_int(num_samples, "num_samples")
    maps, totals, masks = _prepare_pairs(saliency, masks, generator)
    scores = _score_images(
        maps, totals, masks, tolerance, num_samples, 1, generator, pg=False, ch=False
    )
    return scores.spg.squeeze(1)
