r"""Shared composites: a batch grouped into 2x2 composites that serve all four of their images.

:func:`shared_composite_groups` is what :class:`~captum_consistency.GradCamConsistencyLoss`
does with ``composites="shared"``; the grouping runs on the CPU labels with NumPy.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from captum_consistency.composition import NUM_CELLS
from captum_consistency.data._targets import _as_gradcam_targets, _as_targets

__all__ = ["shared_composite_groups"]

#: Rounds of :func:`shared_composite_groups`: each one regroups the images the last one left.
_GROUPING_ROUNDS = 3
#: Proposal rounds that fill the holes left in groups by multi-label conflicts.
_FILL_ROUNDS = 8


def _strided_groups(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(G, 4)`` positions into ``classes``, no class twice in a group, ``G`` as large as can be.

    ``G`` groups can hold at most ``G`` images of a class, so ``G`` is feasible exactly when
    ``sum_c min(count_c, G) >= 4 G``; the largest such ``G`` is taken. Each class keeps at most
    ``G`` of its images (drawn at random), ``4 G`` of those are drawn, ordered class by class
    (classes in random order, images in random order within their class) and dealt out with
    stride ``G``: position ``p`` goes to group ``p % G``. A class occupies at most ``G``
    consecutive positions, so no two of its images meet in a group.
    """
    p = classes.shape[0]
    _, inv, counts = np.unique(classes, return_inverse=True, return_counts=True)
    sizes = np.arange(p // NUM_CELLS + 1)
    feasible = np.minimum(counts[None, :], sizes[:, None]).sum(axis=1) >= NUM_CELLS * sizes
    g = int(sizes[feasible].max())  # feasibility holds on an interval starting at 0
    if g == 0:
        return np.zeros((0, NUM_CELLS), dtype=np.int64)
    order = rng.permutation(p)
    order = order[np.argsort(inv[order], kind="stable")]  # by class, random within a class
    first = np.cumsum(counts) - counts
    kept = order[np.arange(p) - first[inv[order]] < g]  # at most g images of every class
    kept = rng.permutation(kept)[: NUM_CELLS * g]  # 4g of them: leaving some out keeps the cap
    class_rank = rng.permutation(counts.shape[0])  # classes in random order
    kept = kept[np.argsort(class_rank[inv[kept]], kind="stable")]
    return kept.reshape(NUM_CELLS, g).T


def _repair_and_fill(
    groups: np.ndarray, conflict: np.ndarray, taken: np.ndarray, rng: np.random.Generator
) -> Tuple[np.ndarray, bool]:
    """Makes candidate groups valid: drops conflicting members, refills the holes, keeps full ones.

    In every group with a conflict, the member with the most conflicts (random among ties) is
    dropped until none is left (at most three times, over all groups at once). The holes are
    then filled in proposal rounds: every image not yet in a group proposes to a random group
    with a hole whose members it does not conflict with, and each group takes the proposer of
    highest random priority. Groups that are still incomplete are dissolved.

    Returns:
        ``(complete groups (G', 4), whether any candidate group had a conflict)``.
    """
    n, num_groups = conflict.shape[0], groups.shape[0]
    slots = groups.copy()
    had_conflict = False
    for _ in range(NUM_CELLS - 1):
        filled = slots >= 0
        member = np.maximum(slots, 0)
        clash = conflict[member[:, :, None], member[:, None, :]] & filled[:, :, None] & filled[:, None, :]
        degree = clash.sum(axis=2)  # (G, 4) conflicts of each member within its group
        bad = np.flatnonzero(degree.max(axis=1) > 0)
        if bad.size == 0:
            break
        had_conflict = True
        worst = (degree[bad] + 0.5 * rng.random((bad.size, NUM_CELLS))).argmax(axis=1)
        slots[bad, worst] = -1
    if not had_conflict:
        return slots, False
    in_group = taken.copy()
    in_group[slots[slots >= 0]] = True
    for _ in range(_FILL_ROUNDS):
        holes = slots < 0
        open_group = holes.any(axis=1)
        pool = np.flatnonzero(~in_group)
        if pool.size == 0 or not open_group.any():
            break
        # [i, r]: image pool[i] conflicts with no member of group r, and r has a hole.
        clash = conflict[pool[:, None, None], np.maximum(slots, 0)[None]] & ~holes[None]
        compatible = ~clash.any(axis=2) & open_group[None]
        keys = np.where(compatible, rng.random(compatible.shape), -1.0)
        choice = keys.argmax(axis=1)  # each image proposes to one compatible open group
        proposing = keys[np.arange(pool.size), choice] >= 0
        if not proposing.any():
            break
        priority = np.where(proposing, rng.permutation(pool.size), -1)  # distinct: one winner
        winner = np.full(num_groups, -1, dtype=np.int64)
        np.maximum.at(winner, choice[proposing], priority[proposing])
        accepted = proposing & (priority == winner[choice])
        group, image = choice[accepted], pool[accepted]
        slots[group, holes[group].argmax(axis=1)] = image  # into the first hole
        in_group[image] = True
    return slots[(slots >= 0).all(axis=1)], True


def shared_composite_groups(
    targets: Tensor,
    gradcam_targets: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Groups a batch into 2x2 composites shared by the four images they hold.

    Four images can share a composite when each one's regularised class is absent from the
    other three (class ids: four distinct classes; multi-hot: ``targets[j, c_i] == 0`` for every
    pair): each of them is then the positive image of the composite and the other three are
    its distractors, so the composite gives all four their term of Eq. 5 (Pillai &
    Pirsiavash, AAAI 2021) with one forward pass, and the batch needs ``N / 4`` composites
    instead of ``N``. This is what :class:`~captum_consistency.GradCamConsistencyLoss` does
    with ``composites="shared"``.

    **How.** Batched on the CPU, no loop over images: the largest number ``G`` of groups that
    the regularised classes allow (``sum_c min(count_c, G) >= 4 G``) is dealt out with stride
    ``G`` over the images sorted class by class (classes and images within a class in random
    order), so no class appears twice in a group; every group is then checked against the
    full rule (for multi-hot targets, an image can contain another's class), groups that break
    it are dissolved, and the images left are grouped again, for up to four rounds. Each group
    gets a random permutation of the four cells. For class ids this groups as many images as
    any grouping can (the bound above is also necessary); images that are left (a batch size
    that is not a multiple of 4, a class with more than ``N / 4`` images, multi-label
    conflicts) are *ungrouped*: the loss gives them a composite of their own, as in the
    per-image scheme.

    **Distribution.** When the regularised classes of the batch are all distinct (ImageNet's
    1000 classes in a batch of 64), the groups are a uniform random partition of the batch
    and the cells uniform: each image's three cell mates are a uniform random triple of its
    batch mates, the distribution of :func:`in_batch_distractors` (and so the paper's; see the
    module docstring). With repeated classes, images of one class never share a composite,
    as the rule demands, and the stride places images of classes adjacent in the random class
    order together somewhat more often than a uniform draw among the valid groupings would.

    Args:
        targets (Tensor): ``(N,)`` integer class ids, or ``(N, K)`` multi-hot (nonzero =
            present), on any device (they are read on the CPU: pass CPU labels, as the data
            loader gives them, to keep a GPU step free of host-device synchronisations).
        gradcam_targets (Tensor, optional): ``(N,)`` class regularised for each image;
            defaults to ``targets`` for class ids and is required for multi-hot targets. ``-1``
            means no class (the image may then share a composite with any other whose class it
            does not contain).
        generator (torch.Generator, optional): source of randomness (any device; the draws
            are moved to the CPU).

    Returns:
        ``(groups, cells)``: ``groups`` ``(G, 4)`` int64 batch positions, row ``r`` listing
        the images of composite ``r`` in cell order (column ``k`` is cell ``k``, at row
        ``k // 2`` and column ``k % 2`` of the grid); ``cells`` ``(N,)`` int64, the cell of
        every image: its column in ``groups`` for a grouped image, uniform in {0, 1, 2, 3} for
        an ungrouped one. Both on the CPU.

    Examples::

        >>> y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7])
        >>> groups, cells = shared_composite_groups(y)
        >>> groups.shape  # 8 images in 2 composites; one image of class 7 is left
        torch.Size([2, 4])
        >>> bool((cells[groups] == torch.arange(4)).all())
        True
    """
    targets = _as_targets(targets)
    n = targets.shape[0]
    k = targets.shape[1] if targets.dim() == 2 else None
    g = _as_gradcam_targets(gradcam_targets, targets, k).cpu().long()
    # Host work on a few hundred labels: NumPy, whose small operations do not wait on a thread
    # pool (torch's do, badly so while loader workers keep the cores busy). One draw from the
    # generator seeds it.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
    rng = np.random.default_rng(seed)
    g = g.numpy()
    labels = targets.cpu().numpy()
    if labels.ndim == 1:
        conflict = labels[None, :] == g[:, None]  # [i, j]: image j has class g[i]
    else:
        conflict = (labels != 0)[:, np.maximum(g, 0)].T & (g >= 0)[:, None]
    conflict = conflict | conflict.T  # symmetric: either one contains the other's class
    np.fill_diagonal(conflict, False)
    # The class an image is dealt out by: its regularised class; -1 (none) is a class of its own.
    by_class = np.where(g >= 0, g, -1 - np.arange(n))
    taken = np.zeros(n, dtype=bool)
    found = [np.zeros((0, NUM_CELLS), dtype=np.int64)]
    for _ in range(_GROUPING_ROUNDS):
        pool = np.flatnonzero(~taken)
        candidates = pool[_strided_groups(by_class[pool], rng)]
        if candidates.size == 0:
            break
        complete, had_conflict = _repair_and_fill(candidates, conflict, taken, rng)
        found.append(complete)
        taken[complete.ravel()] = True
        if not had_conflict:  # then the stride already took every group the rest allows
            break
    groups = np.concatenate(found)
    # A random permutation of the four cells in every composite.
    groups = np.take_along_axis(groups, rng.random(groups.shape).argsort(axis=1), axis=1)
    cells = rng.integers(0, NUM_CELLS, n)
    cells[groups.ravel()] = np.tile(np.arange(NUM_CELLS), groups.shape[0])
    return torch.from_numpy(groups.astype(np.int64)), torch.from_numpy(cells.astype(np.int64))
