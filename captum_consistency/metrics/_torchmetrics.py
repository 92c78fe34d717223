r"""The paper's interpretation metrics as ``torchmetrics.Metric`` classes (PG, SPG, CH, NQH).

Each class scores a batch with the functional metric of the same name
([`pointing_game`][captum_consistency.metrics.pointing_game],
[`stochastic_pointing_game`][captum_consistency.metrics.stochastic_pointing_game],
[`content_heatmap`][captum_consistency.metrics.content_heatmap],
[`negative_quadrants_heatmap`][captum_consistency.metrics.negative_quadrants_heatmap]) and keeps
sums and counts as states that ``torchmetrics`` sums across processes
(``dist_reduce_fx="sum"``, ``full_state_update=False``): ``compute()`` after ``update()`` on
every rank gives the value of the whole data set, as one process would. Degenerate samples (an
all-zero map, an empty mask, or a map with NaN or infinite values, which the functional metrics
refuse) are left out of the averages and counted in the ``skipped`` state; read it across
processes inside ``with metric.sync_context():`` (``compute()`` restores the local states
after synchronising).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor
from torchmetrics import Metric

from captum_consistency.metrics._functional import (
    _as_maps,
    _check_labels,
    _check_positive_int,
    _check_tolerance,
    _prepare_pairs,
    _score_images,
)
from captum_consistency.metrics.heatmaps import content_heatmap, negative_quadrants_heatmap
from captum_consistency.metrics.pointing import pointing_game, stochastic_pointing_game

__all__ = ["PointingGame", "StochasticPointingGame", "ContentHeatmap", "NegativeQuadrantsHeatmap"]


def _finite_maps(saliency: Tensor) -> Tensor:
    """``(N, H, W)`` maps whose samples holding NaN or infinity are zeroed (scored NaN, skipped)."""
    maps = _as_maps(saliency)
    bad = ~torch.isfinite(maps).flatten(1).all(dim=1)
    if bool(bad.any()):
        maps = maps.masked_fill(bad.view(-1, 1, 1), 0.0)
    return maps


def _sum_state(metric: Metric, name: str, size: Optional[int] = None) -> None:
    shape = () if size is None else (size,)
    metric.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")


class _MeanOfScores(Metric):
    """Per-sample mean of a functional metric; NaN scores are skipped."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _sum_state(self, "total")
        _sum_state(self, "count")
        _sum_state(self, "skipped")

    def _add(self, scores: Tensor) -> None:
        ok = ~torch.isnan(scores)
        self.total += scores[ok].to(torch.float64).sum()
        self.count += ok.sum()
        self.skipped += (~ok).sum()

    def compute(self) -> Tensor:
        """The mean over the scored samples of every process (NaN when none was scored)."""
        return torch.where(self.count > 0, self.total / self.count.clamp(min=1), float("nan"))


class PointingGame(Metric):
    r"""Pointing Game accuracy, per class and macro-averaged as the paper (Sec. 4.3).

    Each sample is scored by [`pointing_game`][captum_consistency.metrics.pointing_game] (a hit
    when the map's maximum is within ``tolerance`` pixels of the mask); ``compute()`` averages
    the per-class accuracies over the classes with at least one scored sample:

    $$
    \mathrm{PG}_{macro} = \frac{1}{|\mathcal{C}|} \sum_{c \in \mathcal{C}}
        \frac{\#\mathrm{hits}_c}{\#\mathrm{hits}_c + \#\mathrm{misses}_c},
    \qquad
    \mathrm{PG}_{micro} = \frac{\sum_c \#\mathrm{hits}_c}{\sum_c (\#\mathrm{hits}_c +
        \#\mathrm{misses}_c)}.
    $$

    Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021; Zhang
    et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016.

    Args:
        num_classes (int): classes of the per-class average (labels in ``0 .. num_classes-1``).
            Default 1: the plain hit rate, labels optional.
        tolerance (float): the margin in pixels (15 in the paper, at 224 x 224).
        average (str): ``"macro"`` (per class, the paper) or ``"micro"`` (per sample).
        **kwargs: ``torchmetrics.Metric`` options (``process_group``, ``sync_on_compute`` ...).

    States (summed across processes): ``hits`` and ``count`` ``(num_classes,)``, ``skipped``
    (all-zero, NaN or infinite maps and empty masks).

    Examples:
        >>> pg = PointingGame(num_classes=1000)
        >>> for maps, masks, labels in batches:  # maps at the masks' size
        ...     pg.update(maps, masks, labels)
        >>> pg.compute()  # tensor(0.8123, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int = 1, tolerance: float = 15, average: str = "macro",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if average not in ("macro", "micro"):
            raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.tolerance = _check_tolerance(tolerance)
        self.average = average
        _sum_state(self, "hits", self.num_classes)
        _sum_state(self, "count", self.num_classes)
        _sum_state(self, "skipped")

    def update(self, saliency: Tensor, masks: Tensor, labels: Optional[Tensor] = None) -> None:
        """Scores a batch.

        Args:
            saliency (Tensor): ``(N, H, W)`` or ``(N, 1, H, W)`` non-negative maps.
            masks (Tensor): boolean ``(N, H, W)`` object masks of the class explained.
            labels (Tensor, optional): ``(N,)`` integer classes; required when
                ``num_classes > 1``.
        """
        hit = pointing_game(_finite_maps(saliency), masks, self.tolerance)
        labels = _check_labels(labels, hit.shape[0], self.num_classes, hit.device)
        ok = ~torch.isnan(hit)
        self.hits.index_add_(0, labels[ok], hit[ok].to(torch.float64))
        self.count.index_add_(0, labels[ok], torch.ones_like(hit[ok], dtype=torch.float64))
        self.skipped += (~ok).sum()

    def compute(self) -> Tensor:
        """Macro (or micro) accuracy over every process's samples; NaN when none was scored."""
        if self.average == "micro":
            total = self.count.sum()
            return torch.where(total > 0, self.hits.sum() / total.clamp(min=1), float("nan"))
        present = self.count > 0
        if not bool(present.any()):
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.hits.device)
        return (self.hits[present] / self.count[present]).mean()

    def per_class(self) -> Tensor:
        """``(num_classes,)`` accuracies (NaN for classes without samples) of the local state;
        inside ``with pg.sync_context():`` those of every process."""
        return torch.where(self.count > 0, self.hits / self.count.clamp(min=1), float("nan"))


class StochasticPointingGame(Metric):
    r"""Stochastic Pointing Game (SPG, Pillai & Pirsiavash 2021, Sec. 4.3), over ``num_runs`` runs.

    Each run scores every sample with
    [`stochastic_pointing_game`][captum_consistency.metrics.stochastic_pointing_game]
    (``num_samples`` locations drawn from the normalised map) and averages over the samples;
    ``compute()`` returns the mean of the runs, or with ``return_std=True`` the mean and the
    standard deviation (``ddof = 0``) of the runs, as the paper reports them (5 runs):

    $$
    \mathrm{SPG}_r = \frac{1}{N} \sum_{i=1}^{N} \mathrm{SPG}_r(m_i, M_i), \qquad
    \mathrm{SPG} = \frac{1}{R} \sum_{r=1}^{R} \mathrm{SPG}_r.
    $$

    Args:
        tolerance (float): margin in pixels (15).
        num_samples (int): draws per map (100).
        num_runs (int): independent runs (5).
        generator (torch.Generator, optional): source of the draws, on the maps' device (per
            rank when distributed).
        return_std (bool): ``compute()`` returns ``(mean, std)``.
        **kwargs: ``torchmetrics.Metric`` options.

    States (summed across processes): ``total`` ``(num_runs,)``, ``count``, ``skipped``.

    Examples:
        >>> spg = StochasticPointingGame(return_std=True, generator=torch.Generator().manual_seed(0))
        >>> spg.update(maps, masks)
        >>> mean, std = spg.compute()
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, tolerance: float = 15, num_samples: int = 100, num_runs: int = 5,
                 generator: Optional[torch.Generator] = None, return_std: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tolerance = _check_tolerance(tolerance)
        self.num_samples = _check_positive_int(num_samples, "num_samples")
        self.num_runs = _check_positive_int(num_runs, "num_runs")
        self.generator = generator
        self.return_std = bool(return_std)
        _sum_state(self, "total", self.num_runs)
        _sum_state(self, "count")
        _sum_state(self, "skipped")

    def update(self, saliency: Tensor, masks: Tensor) -> None:
        """Scores a batch: ``(N, H, W)`` (or ``(N, 1, H, W)``) maps, boolean ``(N, H, W)`` masks."""
        maps, totals, masks = _prepare_pairs(_finite_maps(saliency), masks, self.generator)
        if maps.shape[0] == 0:
            return
        # All runs' draws at once, in the order InterpretationMetrics and the functional metric
        # draw them: a seeded generator gives the same SPG through either accumulator.
        scores = _score_images(maps, totals, masks, self.tolerance, self.num_samples,
                               self.num_runs, self.generator, pg=False, ch=False)
        runs = scores.spg.to(torch.float64)  # (N, R); a degenerate sample is NaN in every run
        ok = ~scores.degenerate
        self.total += runs[ok].sum(dim=0)
        self.count += ok.sum()
        self.skipped += (~ok).sum()

    def compute(self) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Mean of the runs (and their standard deviation with ``return_std``); NaN when no
        sample was scored."""
        runs = torch.where(self.count > 0, self.total / self.count.clamp(min=1), float("nan"))
        mean = runs.mean()
        return (mean, runs.std(unbiased=False)) if self.return_std else mean


class ContentHeatmap(_MeanOfScores):
    r"""Content Heatmap (CH, Pillai & Pirsiavash 2021, Sec. 4.3), averaged over samples.

    $$
    \mathrm{CH} = \frac{1}{N} \sum_{i=1}^{N}
        \frac{\sum_{(x, y) \in M_i} m_i(x, y)}{\sum_{(x, y)} m_i(x, y)},
    $$

    each term by [`content_heatmap`][captum_consistency.metrics.content_heatmap]. Higher is
    better.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.

    States (summed across processes): ``total``, ``count``, ``skipped``.

    Examples:
        >>> ch = ContentHeatmap()
        >>> ch.update(maps, masks)
        >>> ch.compute()
    """

    higher_is_better = True

    def update(self, saliency: Tensor, masks: Tensor) -> None:
        """Scores a batch: ``(N, H, W)`` (or ``(N, 1, H, W)``) maps, boolean ``(N, H, W)`` masks."""
        self._add(content_heatmap(_finite_maps(saliency), masks))


class NegativeQuadrantsHeatmap(_MeanOfScores):
    r"""Negative Quadrants Heatmap (NQH, Pillai & Pirsiavash 2021, Sec. 4.3), averaged over
    composites.

    $$
    \mathrm{NQH} = \frac{1}{N} \sum_{j=1}^{N}
        \Big(1 - \frac{\sum_{(x, y) \in Q_{k_j}} m_j(x, y)}{\sum_{(x, y)} m_j(x, y)}\Big),
    $$

    each term by
    [`negative_quadrants_heatmap`][captum_consistency.metrics.negative_quadrants_heatmap]: the
    mass of a 2x2 composite's map outside its positive cell ``k_j`` (row ``k // 2``, column
    ``k % 2``). Lower is better.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.

    States (summed across processes): ``total``, ``count``, ``skipped``.

    Examples:
        >>> nqh = NegativeQuadrantsHeatmap()
        >>> grid, cells = compose_grid(images, distractors, return_cells=True)
        >>> nqh.update(cam.attribute(grid, target=labels), cells)
        >>> nqh.compute()
    """

    higher_is_better = False

    def update(self, saliency: Tensor, cells: Tensor) -> None:
        """Scores a batch: ``(N, H, W)`` (or ``(N, 1, H, W)``) maps of composites and their
        ``(N,)`` positive cells in ``{0, 1, 2, 3}``."""
        self._add(negative_quadrants_heatmap(_finite_maps(saliency), cells))

