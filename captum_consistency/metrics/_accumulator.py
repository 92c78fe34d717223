r"""Aggregating the interpretation metrics over a dataset, across batches and processes."""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from captum_consistency.metrics._functional import (
    _check_labels,
    _check_positive_int,
    _check_tolerance,
    _prepare_pairs,
    _prepare_saliency,
    _score_images,
)
from captum_consistency.metrics.heatmaps import _check_nqh_cells, _negative_quadrants

__all__ = ["InterpretationMetrics"]


class InterpretationMetrics:
    r"""Accumulates PG, SPG, CH and NQH as the paper reports them (Pillai & Pirsiavash 2021).

    Whole images go through [`update`][captum_consistency.metrics.InterpretationMetrics.update]
    (Pointing Game, Stochastic Pointing Game, Content Heatmap, against object masks); 2x2
    composites go through
    [`update_nqh`][captum_consistency.metrics.InterpretationMetrics.update_nqh] (Negative
    Quadrants Heatmap, against the positive cell).
    [`compute`][captum_consistency.metrics.InterpretationMetrics.compute] aggregates as the
    authors:

    $$
    \mathrm{PG} = \frac{1}{|\mathcal{C}|} \sum_{c \in \mathcal{C}}
        \frac{\#\mathrm{hits}_c}{\#\mathrm{hits}_c + \#\mathrm{misses}_c},
    \qquad
    \mathrm{SPG}_r = \frac{1}{N} \sum_{i=1}^{N} \mathrm{SPG}_r(m_i, M_i),
    \qquad
    \mathrm{CH} = \frac{1}{N} \sum_{i=1}^{N} \mathrm{CH}(m_i, M_i),
    \qquad
    \mathrm{NQH} = \frac{1}{N'} \sum_{j=1}^{N'} \mathrm{NQH}(m_j, k_j),
    $$

    where ``C`` is the set of classes with at least one scored sample, and SPG is run
    ``num_runs`` times with independent draws (5 in the paper) and reported as the mean and the
    standard deviation (``ddof = 0``, as ``numpy.std``) of the ``SPG_r``. A *sample* is one
    (image, class) pair: for multi-label datasets such as COCO, pass one saliency map and one
    mask per class present in the image. All values are fractions in ``[0, 1]`` (multiply by 100
    for the paper's tables).

    Degenerate samples (an all-zero map, or an empty mask) are skipped by every average and
    counted in ``skipped``; the paper's early-training maps can be all zero after the ReLU.

    Distributed evaluation: state is kept as sums and counts on the maps' device, and
    [`compute`][captum_consistency.metrics.InterpretationMetrics.compute] all-reduces them over the
    default process group (or ``process_group``) when ``torch.distributed`` is initialised, so
    every rank gets the dataset-wide result. All ranks must call
    [`compute`][captum_consistency.metrics.InterpretationMetrics.compute] (it is a collective).
    Under NCCL, feed CUDA tensors.

    Args:
        num_classes (int): number of classes for the per-class pointing game (labels are in
            ``0 .. num_classes - 1``). Default 1: plain hit rate, labels optional.
        tolerance (float): PG/SPG margin in pixels (15 in the paper, for 224x224 images).
        num_samples (int): SPG draws per map (100 in the paper).
        num_runs (int): independent SPG runs for the mean and standard deviation (5).
        generator (torch.Generator, optional): source of the SPG draws, on the maps' device;
            seed it for reproducible SPG (per rank when distributed).
        process_group (optional): the ``torch.distributed`` group to reduce over.
        device (torch.device, optional): where to keep the state. By default the device of the
            first maps given; set it when a rank may see no data under NCCL.

    Examples:
        >>> metrics = InterpretationMetrics(num_classes=1000)
        >>> for images, masks, labels in loader:  # whole images, masks at the maps' size
        ...     maps = cam.attribute(images, target=labels)
        ...     metrics.update(maps, masks, labels)
        ...     grid, cells = compose_grid(images, distractors, return_cells=True)
        ...     metrics.update_nqh(cam.attribute(grid, target=labels), cells)
        >>> results = metrics.compute()
        >>> results["pg"], results["spg_mean"], results["spg_std"], results["ch"], results["nqh"]
    """

    def __init__(
        self,
        num_classes: int = 1,
        tolerance: float = 15,
        num_samples: int = 100,
        num_runs: int = 5,
        generator: Optional[torch.Generator] = None,
        process_group: Optional[object] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.tolerance = _check_tolerance(tolerance)
        self.num_samples = _check_positive_int(num_samples, "num_samples")
        self.num_runs = _check_positive_int(num_runs, "num_runs")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator
        self.process_group = process_group
        self._device: Optional[torch.device] = torch.device(device) if device is not None else None
        self.reset()

    # State: float64 sums and counts (exact for counts below 2**53), in one flat tensor so that
    # the distributed reduction is a single all_reduce.
    def _layout(self) -> Dict[str, slice]:
        c, r = self.num_classes, self.num_runs
        sizes = {
            "pg_hits": c,
            "pg_count": c,
            "spg_sum": r,
            "ch_sum": 1,
            "image_count": 1,
            "image_skipped": 1,
            "nqh_sum": 1,
            "nqh_count": 1,
            "nqh_skipped": 1,
        }
        layout, start = {}, 0
        for name, size in sizes.items():
            layout[name] = slice(start, start + size)
            start += size
        return layout

    def reset(self) -> None:
        """Clears the accumulated state (the device is kept)."""
        layout = self._layout()
        total = max(s.stop for s in layout.values())
        self._state = torch.zeros(total, dtype=torch.float64, device=self._device)

    def _bind(self, device: torch.device) -> None:
        if self._device is None:
            self._device = device
            self._state = self._state.to(device)
        elif device != self._device and not (
            device.type == self._device.type and self._device.index is None
        ):
            raise ValueError(
                f"saliency is on {device} but this InterpretationMetrics accumulates on "
                f"{self._device}; keep one device per instance"
            )

    def _add(self, name: str, value: Union[Tensor, float]) -> None:
        self._state[self._layout()[name]] += value

    @torch.no_grad()
    def update(self, saliency: Tensor, masks: Tensor, labels: Optional[Tensor] = None) -> None:
        """Scores whole-image maps against object masks (PG, SPG and CH).

        Args:
            saliency (Tensor): ``(N, H, W)`` or ``(N, 1, H, W)`` non-negative maps, at the
                masks' resolution (see
                [`resize_saliency`][captum_consistency.metrics.resize_saliency]).
            masks (Tensor): boolean ``(N, H, W)`` object masks of the class explained.
            labels (Tensor, optional): ``(N,)`` class of each sample, for the per-class
                pointing game; may be omitted when ``num_classes == 1``.

        Raises:
            ValueError: bad ``saliency``, ``masks`` or ``labels`` (see the functional metrics).
        """
        maps, totals, masks = _prepare_pairs(saliency, masks, self.generator)
        labels = self._check_labels(labels, maps.shape[0], maps.device)
        self._bind(maps.device)
        if maps.shape[0] == 0:
            return
        scores = _score_images(
            maps, totals, masks, self.tolerance, self.num_samples, self.num_runs, self.generator
        )
        ok = ~scores.degenerate
        okf = ok.to(torch.float64)
        hits = torch.nan_to_num(scores.pg.to(torch.float64), nan=0.0)
        layout = self._layout()
        self._state[layout["pg_hits"]].index_add_(0, labels, hits)
        self._state[layout["pg_count"]].index_add_(0, labels, okf)
        spg = torch.nan_to_num(scores.spg.to(torch.float64), nan=0.0)
        self._add("spg_sum", spg.sum(dim=0))
        self._add("ch_sum", torch.nan_to_num(scores.ch.to(torch.float64), nan=0.0).sum())
        self._add("image_count", okf.sum())
        self._add("image_skipped", (~ok).sum().to(torch.float64))

    @torch.no_grad()
    def update_nqh(self, saliency: Tensor, cells: Tensor) -> None:
        """Scores maps of 2x2 composites against their positive cell (NQH).

        Args:
            saliency (Tensor): ``(N, H, W)`` or ``(N, 1, H, W)`` non-negative maps of the
                composites, for the positive image's class.
            cells (Tensor): ``(N,)`` positive cells in ``{0, 1, 2, 3}`` (row ``k // 2``,
                column ``k % 2``), as returned by ``compose_grid(..., return_cells=True)``.

        Raises:
            ValueError: bad ``saliency`` or ``cells`` outside ``0..3``.
        """
        maps, totals = _prepare_saliency(saliency)
        cells = _check_nqh_cells(cells, maps.shape[0], maps.device)
        self._bind(maps.device)
        if maps.shape[0] == 0:
            return
        nqh = _negative_quadrants(maps, totals, cells).to(torch.float64)
        bad = torch.isnan(nqh)
        self._add("nqh_sum", torch.nan_to_num(nqh, nan=0.0).sum())
        self._add("nqh_count", (~bad).sum().to(torch.float64))
        self._add("nqh_skipped", bad.sum().to(torch.float64))

    def _check_labels(self, labels: Optional[Tensor], n: int, device: torch.device) -> Tensor:
        return _check_labels(labels, n, self.num_classes, device)

    def _reduced_state(self) -> Tensor:
        state = self._state.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(state, op=dist.ReduceOp.SUM, group=self.process_group)
        return state

    def compute(self) -> Dict[str, Union[float, int, Tensor]]:
        """The dataset-wide metrics (all-reduced over processes when distributed).

        The keys of the result:

        * ``pg``: per-class pointing-game accuracy averaged over the classes with samples;
        * ``spg_mean``, ``spg_std``: mean and standard deviation (``ddof=0``) over the
          ``num_runs`` runs of the per-image-averaged SPG;
        * ``ch``: per-image-averaged Content Heatmap;
        * ``nqh``: per-composite-averaged Negative Quadrants Heatmap;
        * ``skipped``: degenerate samples skipped, images and composites together, with
          ``skipped_images`` and ``skipped_composites`` separately;
        * ``num_images``, ``num_composites``: samples scored;
        * ``pg_per_class``: float64 CPU tensor ``(num_classes,)`` of per-class accuracies, NaN
          for classes without samples.

        Metrics without any scored sample are NaN. Values are fractions, not percentages.

        Returns:
            dict: the metrics above, Python floats and ints (and one tensor).
        """
        state = self._reduced_state().cpu()
        s = {name: state[sl] for name, sl in self._layout().items()}
        nan = float("nan")
        count = s["pg_count"]
        per_class = torch.where(count > 0, s["pg_hits"] / count.clamp(min=1), nan)
        present = count > 0
        num_images = int(s["image_count"].item())
        runs = s["spg_sum"] / num_images if num_images else torch.full_like(s["spg_sum"], nan)
        num_composites = int(s["nqh_count"].item())
        skipped_images = int(s["image_skipped"].item())
        skipped_composites = int(s["nqh_skipped"].item())
        return {
            "pg": float(per_class[present].mean()) if bool(present.any()) else nan,
            "spg_mean": float(runs.mean()),
            "spg_std": float(runs.std(unbiased=False)),
            "ch": float(s["ch_sum"].item() / num_images) if num_images else nan,
            "nqh": float(s["nqh_sum"].item() / num_composites) if num_composites else nan,
            "skipped": skipped_images + skipped_composites,
            "skipped_images": skipped_images,
            "skipped_composites": skipped_composites,
            "num_images": num_images,
            "num_composites": num_composites,
            "pg_per_class": per_class,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, tolerance={self.tolerance:g}, "
            f"num_samples={self.num_samples}, num_runs={self.num_runs})"
        )
