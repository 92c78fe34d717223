"""Interpretation metrics of the paper (Pillai & Pirsiavash, AAAI 2021, Sec. 4.3).

Functional metrics score a batch of saliency maps, one value per sample:
:func:`pointing_game`, :func:`stochastic_pointing_game`, :func:`content_heatmap` and
:func:`negative_quadrants_heatmap`. :class:`InterpretationMetrics` aggregates them over a
dataset as the paper does (per-class PG, SPG mean and std over 5 runs, per-image CH and NQH),
across batches and ``torch.distributed`` processes. :func:`boxes_to_mask` and
:func:`resize_saliency` prepare the inputs.
"""

from captum_consistency.metrics._accumulator import InterpretationMetrics
from captum_consistency.metrics._functional import (
    content_heatmap,
    negative_quadrants_heatmap,
    pointing_game,
    stochastic_pointing_game,
)
from captum_consistency.metrics._preprocess import boxes_to_mask, resize_saliency

__all__ = [
    "pointing_game",
    "stochastic_pointing_game",
    "content_heatmap",
    "negative_quadrants_heatmap",
    "boxes_to_mask",
    "resize_saliency",
    "InterpretationMetrics",
]
