"""The 2x2 image composer of the GC method (Pillai & Pirsiavash, AAAI 2021, Eq. 4).

Cell convention, shared by training and by the Negative Quadrants Heatmap metric: cell ``k``
sits at row ``k // 2`` and column ``k % 2`` of the grid (0 top-left, 1 top-right, 2 bottom-left,
3 bottom-right).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "compose_grid",
    "compose_shared",
    "split_grid",
    "random_cells",
    "cell_mask",
    "cell_rows_cols",
    "distractor_cells",
    "check_cells",
    "NUM_CELLS",
]

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


def cell_rows_cols(cells: Tensor) -> Tuple[Tensor, Tensor]:
    """Row and column of each cell in the 2x2 grid: ``(k // 2, k % 2)``.

    This is the package's one statement of the cell convention (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right, i.e. ``k = 2 * row + col``), used by the composer, by
    :func:`cell_mask` and by the Negative Quadrants Heatmap.

    Args:
        cells (Tensor): integer cells in {0, 1, 2, 3}, any shape.

    Returns:
        ``(rows, cols)``, integer tensors shaped like ``cells``.

    Examples::

        >>> cell_rows_cols(torch.tensor([0, 1, 2, 3]))
        (tensor([0, 0, 1, 1]), tensor([0, 1, 0, 1]))
    """
    return cells // 2, cells % 2


def check_cells(cells: Tensor, n: int) -> None:
    """Raises unless ``cells`` is an ``(n,)`` integer tensor with values in {0, 1, 2, 3}.

    The range is checked on the cells' own device (on an accelerator, a host-device
    synchronisation).

    Raises:
        TypeError: not an integer tensor.
        ValueError: a wrong shape or a value outside 0..3.
    """
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


def distractor_cells(cells: Tensor) -> Tensor:
    """The three cells left to the distractors of a positive image in cell ``k``, in increasing
    order: ``(N,) -> (N, 3)`` (distractor ``j`` of :func:`compose_grid` goes to column ``j``).

    Examples::

        >>> distractor_cells(torch.tensor([0, 2]))
        tensor([[1, 2, 3],
                [0, 1, 3]])
    """
    return _slot_to_cell_table(cells.device)[cells][..., 1:]


def compose_grid(
    positive: Tensor,
    distractors: Optional[Tensor] = None,
    cells: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_cells: bool = False,
    check: bool = True,
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
        check (bool): check the inputs. ``False`` is for callers whose inputs are valid by
            construction (the GC loss composing a map with the cells it has just used): the
            shapes are then trusted and ``cells`` must already be on ``positive.device``, which
            keeps a training step free of host-device synchronisations.

    Returns:
        The grid ``(N, C, 2H, 2W)`` in ``positive``'s memory format (channels-last in,
        channels-last out), or ``(grid, cells)`` when ``return_cells`` is True. Every source
        is written once, straight into its cell (no intermediate copy); differentiable with
        respect to ``positive`` and ``distractors``.

    Raises:
        ValueError: (with ``check``) shapes that do not match, bad cells, or ``distractors``
            on another device than ``positive``.

    Examples::

        >>> x = torch.rand(8, 3, 224, 224)
        >>> z = torch.rand(8, 3, 3, 224, 224)
        >>> grid, cells = compose_grid(x, z, return_cells=True)
        >>> grid.shape
        torch.Size([8, 3, 448, 448])
        >>> target = compose_grid(saliency, cells=cells)  # zero-padded map, Eq. 4
    """
    if check:
        _check_sources(positive, distractors)
    n = positive.shape[0]
    if cells is None:
        cells = random_cells(n, generator=generator, device=positive.device)
    elif check:
        # Checked on their own device: CPU cells (as random_cells makes them) are checked
        # without a host-device synchronisation, then copied asynchronously.
        check_cells(cells, n)
        cells = cells.to(positive.device, non_blocking=True)
    # Each source is written once, straight to its cell of the output (one batched index_put_
    # per slot), so the composite costs one read of the sources and one write of the grid.
    grid, by_cell = _empty_grids(positive, n, zero=distractors is None)
    rows = torch.arange(n, device=positive.device)
    slot_to_cell = _slot_to_cell_table(positive.device)[cells]  # (N, 4)
    sources = [positive]
    if distractors is not None:
        sources += [distractors[:, j].to(positive.dtype) for j in range(NUM_DISTRACTORS)]
    for slot, source in enumerate(sources):
        _write_cells(by_cell, rows, slot_to_cell[:, slot], source)
    return (grid, cells) if return_cells else grid


def compose_shared(
    images: Tensor, composite_of: Tensor, cells: Tensor, num_composites: int,
    distractors: Optional[Tensor] = None, distractors_of: Optional[Tensor] = None,
) -> Tensor:
    """Composites that hold several of the images: image ``i`` in cell ``cells[i]`` of
    composite ``composite_of[i]`` (the GC loss's shared composites).

    Every cell of every composite must be written exactly once, by an image or by a
    distractor, so the grid starts uninitialised. Channels-last images give channels-last
    composites, as in :func:`compose_grid`.

    Args:
        images (Tensor): ``(N, C, H, W)``.
        composite_of (Tensor): ``(N,)`` CPU int64, the composite of each image.
        cells (Tensor): ``(N,)`` CPU int64, the cell of each image.
        num_composites (int): ``G``.
        distractors (Tensor, optional): ``(U, 3, C, H, W)`` distractors of the images
            ``distractors_of`` (``(U,)`` CPU int64 batch positions): they fill the other three
            cells of those images' composites in increasing cell order, as in
            :func:`compose_grid`.

    Returns:
        Tensor ``(G, C, 2H, 2W)``.
    """
    device = images.device
    grid, by_cell = _empty_grids(images, num_composites)
    _write_cells(
        by_cell, composite_of.to(device, non_blocking=True), cells.to(device, non_blocking=True), images
    )
    if distractors is not None and distractors_of is not None:
        other = distractor_cells(cells[distractors_of]).flatten()
        owner = composite_of[distractors_of].repeat_interleave(NUM_DISTRACTORS)
        _write_cells(
            by_cell,
            owner.to(device, non_blocking=True),
            other.to(device, non_blocking=True),
            distractors.flatten(0, 1).to(images.dtype),
        )
    return grid


def _check_sources(positive: Tensor, distractors: Optional[Tensor]) -> None:
    if not isinstance(positive, Tensor) or positive.dim() != 4:
        shape = tuple(positive.shape) if isinstance(positive, Tensor) else type(positive).__name__
        raise ValueError(f"positive must be a (N, C, H, W) tensor, got {shape}")
    if distractors is None:
        return
    n, c, h, w = positive.shape
    if not isinstance(distractors, Tensor) or distractors.dim() != 5:
        shape = tuple(distractors.shape) if isinstance(distractors, Tensor) else type(distractors).__name__
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
    if distractors.device != positive.device:
        # Copying across devices into the grid is not done: the distractor cells would be
        # left unwritten (uninitialised memory) on some device pairs.
        raise ValueError(
            f"distractors are on {distractors.device} and positive on {positive.device}: move "
            "both to one device (distractors.to(positive.device))"
        )


def _empty_grids(like: Tensor, num: int, zero: bool = False) -> Tuple[Tensor, Tensor]:
    """``num`` grids ``(num, C, 2H, 2W)`` for ``like``'s ``(C, H, W)`` images, in ``like``'s
    memory format (channels-last stays channels-last, as the model expects it), and their view
    ``(num, 2, 2, C, H, W)`` indexed by cell row and column. ``zero``: zero-padded cells."""
    _, c, h, w = like.shape
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grid = torch.empty((num, c, 2 * h, 2 * w), dtype=like.dtype, device=like.device, memory_format=fmt)
    if zero:
        grid.zero_()
    # view() only splits the two spatial dimensions, which works in either memory format.
    return grid, grid.view(num, c, 2, h, 2, w).permute(0, 2, 4, 1, 3, 5)


def _write_cells(by_cell: Tensor, composites: Tensor, cells: Tensor, sources: Tensor) -> None:
    """Writes ``sources[i]`` into cell ``cells[i]`` of grid ``composites[i]`` (differentiably)."""
    rows, cols = cell_rows_cols(cells)
    by_cell[composites, rows, cols] = sources


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
    check_cells(cells, cells.shape[0])
    h, w = size
    rows = torch.arange(h, device=cells.device) >= h // 2  # (H,) True in the bottom half
    cols = torch.arange(w, device=cells.device) >= w // 2
    cell_row, cell_col = cell_rows_cols(cells)
    want_row = cell_row.bool().view(-1, 1, 1)
    want_col = cell_col.bool().view(-1, 1, 1)
    return (rows.view(1, h, 1) == want_row) & (cols.view(1, 1, w) == want_col)
