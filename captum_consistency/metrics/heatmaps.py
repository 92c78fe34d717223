"""The heatmap metrics of the paper (Sec. 4.3): Content Heatmap (CH) and Negative Quadrants
Heatmap (NQH), the fraction of a map's mass inside an object mask or outside a composite's cell.

They run under ``torch.no_grad()``; an all-zero map (or, for CH, an empty mask) scores ``NaN``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captum_consistency.composition import cell_rows_cols, check_cells
from captum_consistency.metrics._functional import (
    _chunks,
    _content,
    _degenerate,
    _nan_where,
    _nonempty,
    _prepare_pairs,
    _prepare_saliency,
)

__all__ = ["content_heatmap", "negative_quadrants_heatmap"]


@torch.no_grad()
def content_heatmap(saliency: Tensor, masks: Tensor) -> Tensor:
    r"""Content Heatmap (CH, Pillai & Pirsiavash 2021, Sec. 4.3): the map's mass inside the mask.

    $$
    \mathrm{CH}(m, M) = \frac{\sum_{(x, y) \in M} m(x, y)}{\sum_{(x, y)} m(x, y)} \in [0, 1].
    $$

    Higher is better. It is the limit of the stochastic pointing game with no margin and
    infinitely many draws, and equals Quantus' ``RelevanceMassAccuracy`` on non-negative maps.

    Args:
        saliency (Tensor): ``(N, H, W)`` or ``(N, 1, H, W)`` non-negative maps.
        masks (Tensor): boolean ``(N, H, W)`` object masks.

    Returns:
        Tensor: ``(N,)`` fractions in ``[0, 1]``; NaN for a degenerate sample (all-zero map
            or empty mask).

    Raises:
        ValueError: negative or NaN ``saliency``, a non-boolean ``masks`` or mismatched shapes.

    Examples:
        >>> saliency = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
        >>> masks = torch.tensor([[[True, False], [False, True]]])
        >>> content_heatmap(saliency, masks)
        tensor([0.6250])
    """
    maps, totals, masks = _prepare_pairs(saliency, masks)
    out = maps.new_empty(maps.shape[0])
    for chunk in _chunks(maps.shape[0], maps[0].numel() if len(maps) else 1, maps.device):
        m, t, k = maps[chunk], totals[chunk], masks[chunk]
        out[chunk] = _content(m, t, k, _degenerate(t, _nonempty(k)))
    return out


@torch.no_grad()
def negative_quadrants_heatmap(saliency: Tensor, cells: Tensor) -> Tensor:
    r"""Negative Quadrants Heatmap (NQH, Pillai & Pirsiavash 2021, Sec. 4.3).

    The fraction of a 2x2 composite's saliency that falls in the three distractor cells, i.e.
    outside the positive cell ``k``:

    $$
    \mathrm{NQH}(m, k) = 1 - \frac{\sum_{(x, y) \in Q_k} m(x, y)}{\sum_{(x, y)} m(x, y)}
        \in [0, 1],
    $$

    where ``Q_k`` is cell ``k`` of the grid with the convention of
    [`compose_grid`][captum_consistency.compose_grid] (row ``k // 2``, column ``k % 2``,
    split at ``H // 2`` and ``W // 2``; see [`cell_mask`][captum_consistency.cell_mask]).
    Lower is better. It equals ``1 - CH`` with the cell's mask, and one minus Quantus'
    ``Focus`` for a mosaic whose only positive quadrant is cell ``k``.

    Args:
        saliency (Tensor): ``(N, H, W)`` or ``(N, 1, H, W)`` non-negative maps of composites.
        cells (Tensor): ``(N,)`` integer positive cells in ``{0, 1, 2, 3}``, as returned by
            ``compose_grid(..., return_cells=True)``.

    Returns:
        Tensor: ``(N,)`` fractions in ``[0, 1]``; NaN for an all-zero map.

    Raises:
        ValueError: negative or NaN ``saliency``, or ``cells`` of the wrong shape or outside
            ``0..3``.

    Examples:
        >>> images, cells = compose_grid(x, distractors, return_cells=True)
        >>> saliency = cam.attribute(images, target=labels)  # (N, 1, h, w)
        >>> nqh = negative_quadrants_heatmap(saliency, cells)
    """
    maps, totals = _prepare_saliency(saliency)
    cells = _check_nqh_cells(cells, maps.shape[0], maps.device)
    return _negative_quadrants(maps, totals, cells)


def _check_nqh_cells(cells: Tensor, n: int, device: torch.device) -> Tensor:
    if not isinstance(cells, Tensor):
        try:
            cells = torch.as_tensor(cells)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"cells must be an integer tensor of shape ({n},), got {type(cells).__name__}"
            )
    check_cells(cells, n)
    return cells.to(device)


def _negative_quadrants(maps: Tensor, totals: Tensor, cells: Tensor) -> Tensor:
    n, height, width = maps.shape
    if n == 0:
        return maps.new_empty(0)
    # Mass of the four cells from two split sums (one pass over the maps). The split is the
    # one of ``cell_mask``: rows >= H // 2 are the bottom cells, columns >= W // 2 the right.
    h2, w2 = height // 2, width // 2
    rows = torch.stack([maps[:, :h2].sum(dim=1), maps[:, h2:].sum(dim=1)], dim=1)  # (N, 2, W)
    per_cell = torch.stack([rows[..., :w2].sum(dim=-1), rows[..., w2:].sum(dim=-1)], dim=-1)
    row, col = cell_rows_cols(cells)
    inside = per_cell[torch.arange(n, device=maps.device), row, col]
    nqh = ((totals - inside) / totals).clamp_(0, 1)
    return _nan_where(nqh, totals <= 0)
