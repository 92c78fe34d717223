"""The 2x2 image composer of the GC method (Pillai & Pirsiavash, AAAI 2021, Eq. 4).

Cell convention, shared by training and by the Negative Quadrants Heatmap metric: cell ``k``
sits at row ``k // 2`` and column ``k % 2`` of the grid (0 top-left, 1 top-right, 2 bottom-left,
3 bottom-right).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["compose_grid", "split_grid", "random_cells", "cell_mask", "NUM_CELLS"]

NUM_CELLS = 4
NUM_DISTRACTORS = NUM_CELLS - 1


def random_cells(
    n: int, generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None
) -> Tensor:
    """Draws ``n`` cell indices uniformly from {0, 1, 2, 3}.

    The draw happens on the generator's device (CPU unless a CUDA generator is given) and is
    moved to ``device`` afterwards, so a CPU generator gives the same cells on every device.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    cells = torch.randint(0, NUM_CELLS, (n,), generator=generator, device=gen_device)
    return cells.to(device) if device is not None else cells


def _check_cells(cells: Tensor, n: int) -> None:
    if not isinstance(cells, Tensor):
        raise TypeError(f"cells must be a LongTensor of shape ({n},), got {type(cells).__name__}")
    if cells.dtype.is_floating_point or cells.dtype == torch.bool or cells.dtype.is_complex:
        raise TypeError(f"cells must be an integer tensor, got dtype {cells.dtype}")
    if cells.shape != (n,):
        raise ValueError(f"cells must have shape ({n},), got {tuple(cells.shape)}")
    if n and (int(cells.min()) < 0 or int(cells.max()) >= NUM_CELLS):
        raise ValueError(
            f"cells must lie in 0..{NUM_CELLS - 1}, got values in "
            f"[{int(cells.min())}, {int(cells.max())}]"
        )


# For each positive cell k, the cell that each slot goes to: slot 0 is the positive image, slots
# 1..3 are distractors 0..2 in order, filling the remaining cells in increasing order.
_SLOT_TO_CELL = torch.tensor(
    [[k] + [c for c in range(NUM_CELLS) if c != k] for k in range(NUM_CELLS)], dtype=torch.long
)
_SLOT_TO_CELL_ON: Dict[torch.device, Tensor] = {}


def _slot_to_cell_table(device: torch.device) -> Tensor:
    # Cached per device: copying the constant from pageable host memory at every call would
    # synchronise the CUDA stream in the middle of a training step.
    table = _SLOT_TO_CELL_ON.get(device)
    if table is None:
        table = _SLOT_TO_CELL_ON[device] = _SLOT_TO_CELL.to(device)
    return table


def compose_grid(
    positive: Tensor,
    distractors: Optional[Tensor] = None,
    cells: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_cells: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Places each positive image in cell ``k`` of a 2x2 grid, distractors in the other cells.

    This is the composition operator ``comp(k, x, z_1, z_2, z_3)`` of the paper. With
    ``distractors=None`` the other cells are zero, which is exactly the target of Eq. 4,
    ``comp(k, g_x^y, 0, 0, 0)``: zero-padding a saliency map into its cell.

    Args:
        positive (Tensor): ``(N, C, H, W)`` images (or maps) to place.
        distractors (Tensor, optional): ``(N, 3, C, H, W)``; they fill the three remaining cells
            in increasing cell order. ``None`` means zeros.
        cells (Tensor, optional): ``(N,)`` integer cell indices in {0, 1, 2, 3}; cell ``k`` is at
            row ``k // 2``, column ``k % 2``. Drawn uniformly from ``generator`` when ``None``.
            Their range is checked on their own device: pass CPU cells to a CUDA batch to keep
            the check free of a host-device synchronisation.
        generator (torch.Generator, optional): source of the random cells.
        return_cells (bool): also return the cells used.

    Returns:
        The grid ``(N, C, 2H, 2W)`` in ``positive``'s memory format (channels-last in,
        channels-last out), or ``(grid, cells)`` when ``return_cells`` is True. Every source
        is written once, straight into its cell (no intermediate copy); differentiable with
        respect to ``positive`` and ``distractors``.

    Examples::

        >>> x = torch.rand(8, 3, 224, 224)
        >>> z = torch.rand(8, 3, 3, 224, 224)
        >>> grid, cells = compose_grid(x, z, return_cells=True)
        >>> grid.shape
        torch.Size([8, 3, 448, 448])
        >>> target = compose_grid(saliency, cells=cells)  # zero-padded map, Eq. 4
    """
    if not isinstance(positive, Tensor) or positive.dim() != 4:
        shape = tuple(positive.shape) if isinstance(positive, Tensor) else type(positive).__name__
        raise ValueError(f"positive must be a (N, C, H, W) tensor, got {shape}")
    n, c, h, w = positive.shape
    if distractors is not None:
        if not isinstance(distractors, Tensor) or distractors.dim() != 5:
            shape = (
                tuple(distractors.shape) if isinstance(distractors, Tensor) else type(distractors).__name__
            )
            raise ValueError(f"distractors must be a (N, 3, C, H, W) tensor, got {shape}")
        if distractors.shape[1] != NUM_DISTRACTORS:
            raise ValueError(
                f"distractors must hold exactly 3 images per sample (dim 1), got {distractors.shape[1]}"
            )
        if distractors.shape[0] != n or distractors.shape[2:] != positive.shape[1:]:
            raise ValueError(
                "distractors must have shape (N, 3, C, H, W) = "
                f"{(n, NUM_DISTRACTORS, c, h, w)} to match positive, got {tuple(distractors.shape)}"
            )
    if cells is None:
        cells = random_cells(n, generator=generator, device=positive.device)
    else:
        # Checked on their own device: CPU cells (as random_cells makes them) are checked
        # without a host-device synchronisation, then copied asynchronously.
        _check_cells(cells, n)
        cells = cells.to(positive.device, non_blocking=True)

    grid = _compose_checked_cells(positive, distractors, cells)
    return (grid, cells) if return_cells else grid


def _compose_checked_cells(positive: Tensor, distractors: Optional[Tensor], cells: Tensor) -> Tensor:
    """:func:`compose_grid` on inputs already checked (cells on ``positive.device``).

    Each source image is written once, straight to its cell of the output: four batched
    ``index_put_`` (one per slot, over the whole batch) into a ``(N, 2, 2, C, H, W)`` view of
    the grid, so the composite costs one read of the sources and one write of the grid, with
    no intermediate copy. The grid keeps ``positive``'s memory format (channels-last stays
    channels-last, as the model expects it). Differentiable with respect to every source.
    """
    n, c, h, w = positive.shape
    channels_last = positive.is_contiguous(memory_format=torch.channels_last) and not positive.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grid = torch.empty((n, c, 2 * h, 2 * w), dtype=positive.dtype, device=positive.device, memory_format=fmt)
    if distractors is None:
        grid.zero_()  # zero-padding: the other three cells stay empty
    # view() only splits the two spatial dimensions, which works in either memory format.
    by_cell = grid.view(n, c, 2, h, 2, w).permute(0, 2, 4, 1, 3, 5)  # [:, row, col] is a cell
    rows = torch.arange(n, device=positive.device)
    slot_to_cell = _slot_to_cell_table(positive.device)[cells]  # (N, 4)
    sources = [positive]
    if distractors is not None:
        sources += [distractors[:, j].to(positive.dtype) for j in range(NUM_DISTRACTORS)]
    for slot, source in enumerate(sources):
        cell = slot_to_cell[:, slot]
        by_cell[rows, cell // 2, cell % 2] = source
    return grid


def split_grid(grid: Tensor) -> Tensor:
    """Inverse of :func:`compose_grid` up to the slot order: ``(N, C, 2H, 2W) -> (N, 4, C, H, W)``.

    Entry ``[:, k]`` is cell ``k`` (row ``k // 2``, column ``k % 2``).

    Args:
        grid (Tensor): ``(N, C, 2H, 2W)`` with even height and width.

    Returns:
        Tensor ``(N, 4, C, H, W)``.

    Examples::

        >>> cells = split_grid(compose_grid(x, z, cells=torch.tensor([2])))
        >>> torch.equal(cells[:, 2], x)
        True
    """
    if not isinstance(grid, Tensor) or grid.dim() != 4:
        raise ValueError(f"grid must be a (N, C, 2H, 2W) tensor, got {getattr(grid, 'shape', grid)}")
    n, c, hh, ww = grid.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"grid height and width must be even, got {hh}x{ww}")
    h, w = hh // 2, ww // 2
    return grid.reshape(n, c, 2, h, 2, w).permute(0, 2, 4, 1, 3, 5).reshape(n, NUM_CELLS, c, h, w)


def cell_mask(cells: Tensor, size: Tuple[int, int]) -> Tensor:
    """Boolean masks ``(N, H, W)`` that are True inside cell ``k`` of an ``H x W`` composite.

    For odd sizes the split is at ``H // 2`` and ``W // 2``.

    Args:
        cells (Tensor): ``(N,)`` integer cells in {0, 1, 2, 3}.
        size (tuple): ``(H, W)`` of the composite.

    Returns:
        Bool tensor ``(N, H, W)`` on ``cells.device``.

    Examples::

        >>> cell_mask(torch.tensor([1]), (4, 4))[0].int()
        tensor([[0, 0, 1, 1],
                [0, 0, 1, 1],
                [0, 0, 0, 0],
                [0, 0, 0, 0]], dtype=torch.int32)
    """
    if not isinstance(cells, Tensor) or cells.dim() != 1:
        raise ValueError(f"cells must be a (N,) tensor, got {getattr(cells, 'shape', type(cells))}")
    _check_cells(cells, cells.shape[0])
    h, w = size
    rows = torch.arange(h, device=cells.device) >= h // 2  # (H,) True in the bottom half
    cols = torch.arange(w, device=cells.device) >= w // 2
    want_row = (cells // 2).bool().view(-1, 1, 1)
    want_col = (cells % 2).bool().view(-1, 1, 1)
    return (rows.view(1, h, 1) == want_row) & (cols.view(1, 1, w) == want_col)
