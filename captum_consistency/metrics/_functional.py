r"""Building blocks of the paper's interpretation metrics (Pillai & Pirsiavash, AAAI 2021, Sec. 4.3).

The public metrics live in ``metrics.pointing`` (PG, SPG) and ``metrics.heatmaps`` (CH, NQH);
this module holds what they and
[`InterpretationMetrics`][captum_consistency.metrics.InterpretationMetrics] share: input
checks, chunking and the exact tolerance test. Every metric scores a whole batch
of maps ``(N, H, W)`` (or ``(N, 1, H, W)``) at once, on the maps' device, with no Python loop
over samples or pixels; on CPU the batch is split into a few chunks of about
``CPU_CHUNK_ELEMENTS`` values so that temporaries stay cache-sized. The metrics run under
``torch.no_grad()`` and accept maps that require grad (e.g. straight from a Captum attribution)
without recording a graph.

How the tolerance test is exact and fast: a point ``(u, v)`` hits the mask when some mask pixel
``(x, y)`` has ``(x - u)^2 + (y - v)^2 < t^2``. The disk of radius ``t`` is a stack of horizontal
segments, one per row offset ``dy`` with ``dy^2 < t^2``, of half-width
``w(dy) = max{w : dy^2 + w^2 < t^2}``. With the masks' running counts along each row, "does row
``v + dy`` hold a mask pixel in columns ``[u - w(dy), u + w(dy)]``" is one subtraction, so a
point costs ``2 * (2 ceil(t) - 1)`` look-ups whatever the image size, and all points of all
samples are tested with two ``gather`` calls. The pointing game alone (one point per map) reads
the ``~pi t^2`` mask pixels under the disk directly instead. Either way the result is exactly
the brute-force test of TorchRay's ``PointingGame.evaluate``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor


__all__: list = []  # private building blocks; the metrics are in pointing.py and heatmaps.py


# --------------------------------------------------------------------------------------------
# Input checks and shared building blocks (also used by the accumulator).
# --------------------------------------------------------------------------------------------


class _Saliency(NamedTuple):
    maps: Tensor  # (N, H, W), floating
    totals: Tensor  # (N,) per-sample mass


def _as_maps(saliency: Tensor, argname: str = "saliency") -> Tensor:
    """``(N, H, W)`` or ``(N, 1, H, W)`` -> floating ``(N, H, W)`` view; checks the shape only."""
    if not isinstance(saliency, Tensor):
        raise TypeError(f"{argname} must be a Tensor, got {type(saliency).__name__}")
    if saliency.dim() == 4 and saliency.shape[1] == 1:
        saliency = saliency.squeeze(1)
    if saliency.dim() != 3 or saliency.shape[1] == 0 or saliency.shape[2] == 0:
        raise ValueError(
            f"{argname} must have shape (N, H, W) or (N, 1, H, W) with H, W >= 1, "
            f"got {tuple(saliency.shape)}"
        )
    if saliency.dtype == torch.bool or saliency.dtype.is_complex:
        raise ValueError(f"{argname} must be a real-valued tensor, got dtype {saliency.dtype}")
    if not saliency.dtype.is_floating_point or saliency.dtype in (torch.float16, torch.bfloat16):
        saliency = saliency.float()  # exact sums for integers, accurate sums for half types
    return saliency


def _prepare_saliency(saliency: Tensor, argname: str = "saliency") -> _Saliency:
    """Shape, sign and finiteness checks; returns the maps and their per-sample mass."""
    maps = _as_maps(saliency, argname)
    totals = maps.flatten(1).sum(dim=1)
    if maps.numel():
        # One host sync for both checks; ``min >= 0`` is False for NaN as well.
        minimum = maps.amin()
        if not bool((minimum >= 0) & torch.isfinite(totals).all()):
            if torch.isnan(maps).any():
                raise ValueError(f"{argname} must not contain NaN")
            if float(minimum) < 0:
                raise ValueError(
                    f"{argname} must be non-negative (apply a ReLU or take the positive part "
                    f"first), got a minimum of {float(minimum):.4g}"
                )
            raise ValueError(f"{argname} must be finite, got a map whose sum is not finite")
    return _Saliency(maps, totals)


def _check_masks(
    masks: Tensor, shape: torch.Size, device: torch.device, argname: str = "masks"
) -> Tensor:
    """Boolean ``(N, H, W)`` (or ``(N, 1, H, W)``) of the saliency's shape, on its device."""
    if not isinstance(masks, Tensor):
        raise TypeError(f"{argname} must be a bool Tensor, got {type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise ValueError(
            f"{argname} must be a boolean tensor (e.g. `{argname} > 0`), got dtype {masks.dtype}"
        )
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks.squeeze(1)
    if masks.shape != shape:
        raise ValueError(
            f"{argname} must have the saliency's shape {tuple(shape)} (N, H, W), "
            f"got {tuple(masks.shape)}"
        )
    return masks.to(device)


def _check_labels(labels: Optional[Tensor], n: int, num_classes: int, device: torch.device) -> Tensor:
    if labels is None:
        if num_classes != 1:
            raise ValueError(f"labels are required for the per-class pointing game (num_classes={num_classes})")
        return torch.zeros(n, dtype=torch.long, device=device)
    labels = torch.as_tensor(labels, device=device)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()


def _check_tolerance(tolerance: float) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(
            f"tolerance must be a real number of pixels, got {type(tolerance).__name__}"
        )
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive finite number of pixels, got {tolerance}")
    return float(tolerance)


def _check_positive_int(value: int, argname: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{argname} must be a positive integer, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=64)
def _disk_rows(
    tolerance: float, height: int, width: int
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Row offsets ``dy`` and half-widths ``w(dy)`` of the open disk ``dx^2 + dy^2 < t^2``.

    Only offsets that can reach inside an ``height x width`` image are kept, and half-widths are
    capped at ``width - 1`` (a wider segment covers the whole row anyway).
    """
    t2 = tolerance * tolerance
    reach = min(math.ceil(tolerance) - 1, height - 1)  # largest |dy| with dy^2 < t^2, in image
    while reach >= 0 and reach * reach >= t2:
        reach -= 1
    offsets, half_widths = [], []
    for dy in range(-reach, reach + 1):
        rest = t2 - dy * dy
        w = max(math.ceil(math.sqrt(rest)) - 1, 0)
        while (w + 1) * (w + 1) < rest:  # guard against rounding of the square root
            w += 1
        while w > 0 and w * w >= rest:
            w -= 1
        offsets.append(dy)
        half_widths.append(min(w, width - 1))
    return tuple(offsets), tuple(half_widths)


#: Up to this many disk offsets, the pointing game reads the disk around the maximum directly
#: (``N x K`` look-ups) instead of building the row counts of the whole masks.
_MAX_DIRECT_DISK = 4096


@functools.lru_cache(maxsize=64)
def _disk_offsets(tolerance: float, height: int, width: int) -> Tensor:
    """All offsets ``(dy, dx)`` of the open disk, as a CPU ``(2, K)`` tensor."""
    dys, half_widths = _disk_rows(tolerance, height, width)
    pairs = [(dy, dx) for dy, w in zip(dys, half_widths) for dx in range(-w, w + 1)]
    return torch.tensor(pairs, dtype=torch.long).T.contiguous()


def _disk_hits(masks: Tensor, points: Tensor, tolerance: float) -> Optional[Tensor]:
    """Hit test of one point per sample by reading the mask under the disk around it.

    Returns bool ``(N,)``, or ``None`` when the disk is too large for this to pay off.
    """
    n, height, width = masks.shape
    _, half_widths = _disk_rows(tolerance, height, width)
    if sum(2 * w + 1 for w in half_widths) > _MAX_DIRECT_DISK:
        return None
    offsets = _disk_offsets(tolerance, height, width)
    dy, dx = offsets.to(masks.device, non_blocking=True).unbind(0)  # (K,) each
    y = torch.div(points, width, rounding_mode="floor")  # (N, 1)
    x = points - y * width
    yy, xx = y + dy, x + dx  # (N, K)
    inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    flat = yy.clamp_(0, height - 1) * width + xx.clamp_(0, width - 1)
    return (masks.flatten(1).gather(1, flat) & inside).any(dim=1)


class _MaskIndex:
    """The masks preprocessed for exact, batched tolerance tests at arbitrary points.

    Holds the running count of mask pixels along each row of the masks, zero-padded so that
    every segment of the disk stays inside the buffer (no clamping, no bounds test): row
    ``v + dy`` holds a mask pixel in columns ``u - w .. u + w`` exactly when the counts at the
    segment's last column and at the column before it differ. A tolerance beyond the image
    diagonal reaches every pixel, so any non-empty mask is hit and no counts are needed.

    Args:
        masks: bool ``(N, H, W)``.
        tolerance: the margin ``t`` (positive).
    """

    def __init__(self, masks: Tensor, tolerance: float) -> None:
        n, height, width = masks.shape
        self.shape = (n, height, width)
        self.everywhere = tolerance * tolerance > (height - 1) ** 2 + (width - 1) ** 2
        if self.everywhere or n == 0:
            self.nonempty = _nonempty(masks)
            return
        dys, half_widths = _disk_rows(tolerance, height, width)
        top, left, right = max(dys), max(half_widths) + 1, max(half_widths)
        self._top, self._left = top, left
        padded_width = left + width + right
        padded = masks.new_zeros(n, top + height + top, padded_width)
        padded[:, top : top + height, left : left + width] = masks
        dtype = torch.int16 if padded_width < 2**15 else torch.int32  # less memory traffic
        counts = torch.cumsum(padded, dim=-1, dtype=dtype)
        self.nonempty = counts[:, :, -1].sum(dim=1, dtype=torch.int64) > 0
        self.counts = counts.flatten(1)
        self._width_padded = padded_width
        dy = torch.tensor(dys, dtype=torch.long, device=masks.device)
        hw = torch.tensor(half_widths, dtype=torch.long, device=masks.device)
        self._last = dy * padded_width + hw  # offset of the segment's last column
        self._before = dy * padded_width - hw - 1  # offset of the column before the segment

    def hits(self, points: Tensor) -> Tensor:
        """Whether each point is at distance ``< tolerance`` of a mask pixel.

        Args:
            points: ``(N, P)`` flat pixel indices ``y * W + x``.

        Returns:
            Bool ``(N, P)``.
        """
        n, p = points.shape
        if self.everywhere or n == 0:
            return self.nonempty.view(n, 1).expand(n, p)
        width = self.shape[2]
        y = torch.div(points, width, rounding_mode="floor")
        origin = (y + self._top) * self._width_padded + (points - y * width + self._left)
        origin = origin.unsqueeze(-1)
        upto_last = self.counts.gather(1, (origin + self._last).view(n, -1))
        upto_before = self.counts.gather(1, (origin + self._before).view(n, -1))
        return (upto_last != upto_before).view(n, p, -1).any(dim=-1)


def _argmax_points(maps: Tensor) -> Tensor:
    """Flat index of each map's maximum, ``(N, 1)``; the first one in row-major order on ties.

    Two-level search: the first row holding the maximum (a plain ``amax`` over rows, much
    cheaper on CPU than an index-tracking ``max`` over the whole map), then the first column
    holding it in that row. ``argmax`` returns the first maximal index, so this is exactly the
    row-major first maximum.
    """
    n, _, width = maps.shape
    row = maps.amax(dim=2).argmax(dim=1)  # (N,)
    col = maps[torch.arange(n, device=maps.device), row].argmax(dim=1)  # (N,)
    return (row * width + col).unsqueeze(1)


def _check_generator(generator: Optional[torch.Generator], device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator must live on the saliency's device ({device}), "
            f"got a generator on {generator.device}"
        )


def _prepare_pairs(
    saliency: Tensor, masks: Tensor, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(maps, totals, masks)`` of checked (map, mask) pairs; ``generator`` (if any) checked
    against the maps' device."""
    maps, totals = _prepare_saliency(saliency)
    masks = _check_masks(masks, maps.shape, maps.device)
    _check_generator(generator, maps.device)
    return maps, totals, masks


_MAX_CATEGORIES = 2**24  # torch.multinomial's limit


def _sample_points(
    maps: Tensor, totals: Tensor, num_samples: int, generator: Optional[torch.Generator]
) -> Tensor:
    """``(N, num_samples)`` flat indices drawn with replacement with probability ``m / sum(m)``.

    All-zero maps (degenerate samples, scored NaN by the callers) draw uniformly instead.
    """
    weights = maps.flatten(1)
    if weights.shape[1] > _MAX_CATEGORIES:
        raise ValueError(
            f"saliency maps for the stochastic pointing game may have at most 2**24 pixels "
            f"(torch.multinomial), got {tuple(maps.shape[1:])}; resize them first"
        )
    empty = totals <= 0
    if bool(empty.any()):
        weights = torch.where(empty.unsqueeze(1), torch.ones_like(weights), weights)
    return torch.multinomial(weights, num_samples, replacement=True, generator=generator)


def _degenerate(totals: Tensor, nonempty: Optional[Tensor] = None) -> Tensor:
    """Samples with an all-zero map (or, given ``nonempty``, an empty mask), ``(N,)`` bool."""
    zero = totals <= 0
    return zero if nonempty is None else zero | ~nonempty


def _nan_where(values: Tensor, degenerate: Tensor) -> Tensor:
    return values.masked_fill(degenerate, float("nan"))


#: On CPU, samples are scored in chunks whose temporaries hold about this many elements, so
#: that they stay in the allocator's cache instead of being page-faulted in for every batch.
#: On accelerators the whole batch is one chunk.
CPU_CHUNK_ELEMENTS = 1 << 21


def _chunks(n: int, elements_per_sample: int, device: torch.device) -> Iterator[slice]:
    """Slices of the batch; a handful of chunks, never one per sample on a realistic batch."""
    if device.type != "cpu":
        size = max(n, 1)
    else:
        size = max(1, CPU_CHUNK_ELEMENTS // max(elements_per_sample, 1))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _nonempty(masks: Tensor) -> Tensor:
    """Whether each mask has a pixel, ``(N,)`` (``uint8`` max: far faster than ``any`` on CPU)."""
    return masks.flatten(1).view(torch.uint8).amax(dim=1) > 0


def _content(maps: Tensor, totals: Tensor, masks: Tensor, degenerate: Tensor) -> Tensor:
    inside = (maps * masks.view(torch.uint8)).flatten(1).sum(dim=1)
    return _nan_where((inside / totals).clamp_(0, 1), degenerate)


class _ImageScores(NamedTuple):
    pg: Tensor  # (N,) 0/1, NaN when degenerate
    spg: Tensor  # (N, num_runs), NaN when degenerate
    ch: Tensor  # (N,), NaN when degenerate
    degenerate: Tensor  # (N,) bool


def _score_images(
    maps: Tensor,
    totals: Tensor,
    masks: Tensor,
    tolerance: float,
    num_samples: int,
    num_runs: int,
    generator: Optional[torch.Generator],
    pg: bool = True,
    ch: bool = True,
) -> _ImageScores:
    """PG, SPG (``num_runs`` independent runs) and CH sharing one pass of preprocessing.

    Inputs are already checked. ``num_runs = 0`` skips SPG; ``pg``/``ch`` False skip those.
    """
    n, height, width = maps.shape
    draws = num_samples * num_runs
    out_pg = maps.new_full((n,), float("nan"))
    out_spg = maps.new_full((n, num_runs), float("nan"))
    out_ch = maps.new_full((n,), float("nan"))
    degenerate = torch.ones(n, dtype=torch.bool, device=maps.device)
    # All draws at once, so that they do not depend on the chunking.
    points = _sample_points(maps, totals, draws, generator) if draws and n else None
    disk_rows = len(_disk_rows(tolerance, height, width)[0])
    per_sample = max(height * width, draws * disk_rows)
    for chunk in _chunks(n, per_sample, maps.device):
        m, t, k = maps[chunk], totals[chunk], masks[chunk]
        hit = None
        if pg and not draws:  # the pointing game alone: no need to index the whole masks
            hit = _disk_hits(k, _argmax_points(m), tolerance)
        if hit is None or draws:
            index = _MaskIndex(k, tolerance)
            nonempty = index.nonempty
        else:
            nonempty = _nonempty(k)
        bad = _degenerate(t, nonempty)
        degenerate[chunk] = bad
        if pg:
            if hit is None:
                hit = index.hits(_argmax_points(m)).squeeze(1)
            out_pg[chunk] = _nan_where(hit.to(maps.dtype), bad)
        if draws:
            hits = index.hits(points[chunk]).view(-1, num_runs, num_samples)
            spg = hits.sum(dim=-1).to(maps.dtype) / num_samples
            out_spg[chunk] = _nan_where(spg, bad.unsqueeze(1))
        if ch:
            out_ch[chunk] = _content(m, t, k, bad)
    return _ImageScores(out_pg, out_spg, out_ch, degenerate)
