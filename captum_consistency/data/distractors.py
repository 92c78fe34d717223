r"""Distractor images for the 2x2 composite of the GC loss.

The GC loss (Pillai & Pirsiavash, AAAI 2021, Sec. 3) places an image ``x`` of class ``y`` in a
random cell of a 2x2 grid and fills the other three cells with *distractors*: images drawn at
random from the training set among those whose labels exclude ``y`` (multi-label: images that do
not contain ``y``). The authors' loader decodes the three distractors of every sample in the
data loader, four images per sample, which starves a GPU.

This module gives two exact ways to draw them, and a way to combine them:

- :func:`in_batch_distractors` / :func:`gather_distractors` take them from the batch itself:
  the other samples of the batch that qualify, three distinct ones drawn uniformly, fully
  batched and without decoding a single extra image.
- :class:`DatasetDistractorSampler` draws dataset indices from per-class index arrays built
  once: uniform over the qualifying images, three distinct ones, no rejection loop, seeded and
  different on every ``torchrun`` rank, loader worker and epoch. :class:`DistractorFallback`
  turns its indices into images, for the rows of a batch with fewer than three qualifying
  samples; :class:`DatasetWithDistractors` is the authors' scheme (``--distractors dataset``),
  distractors decoded in the loader workers.

**Why in-batch distractors follow the paper's distribution.** The paper draws, for each sample
``x`` of class ``y``, three distinct distractors uniformly from the training images whose labels
exclude ``y``. A batch is a uniform random sample of the training set (a shuffled epoch, or a
:class:`~torch.utils.data.DistributedSampler` shard of one): given ``x``, its batch mates are a
uniform random subset of the other training images, so every qualifying image is equally likely
to be among them; :func:`in_batch_distractors` then picks three distinct qualifying mates
uniformly (random keys, top 3). By this symmetry, the triple given to ``x`` is a uniform draw of
three distinct images among all qualifying training images, the paper's distribution; rows whose
batch holds fewer than three qualifying mates are drawn from the data set with the same
distribution (:class:`DatasetDistractorSampler`), so the condition "enough mates" does not bias
it either. What differs is only the *joint* distribution across samples (a batch member can be
the distractor of several samples); since the loss is a mean over samples, its expectation, and
so the expected gradient, is exactly the paper's (linearity of expectation).
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from captum_consistency.composition import NUM_CELLS, NUM_DISTRACTORS

__all__ = [
    "in_batch_distractors",
    "gather_distractors",
    "sample_present_classes",
    "shared_composite_groups",
    "DatasetDistractorSampler",
    "DistractorFallback",
    "DatasetWithDistractors",
    "collate_with_distractors",
]

_MAX_INDEX = 2**62  # raw draws are reduced modulo the bound: bias below 2**-40 for 1M images


def _as_targets(targets: Any, name: str = "targets") -> Tensor:
    if not isinstance(targets, Tensor):
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a tensor of class ids or multi-hot rows, got {type(targets).__name__}") from e
    if targets.dim() not in (1, 2):
        raise ValueError(
            f"{name} must be (N,) class ids or (N, K) multi-hot, got shape {tuple(targets.shape)}"
        )
    if targets.dim() == 1 and (targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dtype.is_complex):
        raise TypeError(f"1-D {name} must hold integer class ids, got dtype {targets.dtype}")
    return targets


def _as_gradcam_targets(
    gradcam_targets: Optional[Any], targets: Tensor, num_classes: Optional[int]
) -> Tensor:
    n = targets.shape[0]
    if gradcam_targets is None:
        if targets.dim() == 2:
            raise ValueError(
                "gradcam_targets is required with multi-hot (N, K) targets: the class regularised "
                "for each sample (e.g. sample_present_classes(targets))"
            )
        return targets
    g = gradcam_targets if isinstance(gradcam_targets, Tensor) else torch.as_tensor(gradcam_targets)
    if g.dtype.is_floating_point or g.dtype == torch.bool or g.dtype.is_complex:
        raise TypeError(f"gradcam_targets must hold integer class ids, got dtype {g.dtype}")
    if g.shape != (n,):
        raise ValueError(f"gradcam_targets must have shape ({n},), got {tuple(g.shape)}")
    if n:
        lo, hi = torch.stack([g.min(), g.max()]).tolist()  # one host sync for both checks
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"gradcam_targets must lie in -1..{num_classes - 1}, got max {hi}")
        if lo < -1:
            raise ValueError(f"gradcam_targets must be class ids >= 0 (or -1: no class), got {lo}")
    return g.to(targets.device)


def _contains_class(targets: Tensor, g: Tensor) -> Tensor:
    """``(N, N)`` bool, ``[i, j]``: sample ``j`` contains class ``g[i]`` (never for ``g[i] == -1``)."""
    if targets.dim() == 1:
        return targets.unsqueeze(0) == g.unsqueeze(1)
    present = targets != 0
    return present[:, g.clamp(min=0)].t() & (g >= 0).unsqueeze(1)


def _rand(shape: Tuple[int, ...], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def in_batch_distractors(
    targets: Tensor,
    gradcam_targets: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Three distinct in-batch distractors per sample, drawn uniformly among the qualifying ones.

    Sample ``j`` qualifies as a distractor of sample ``i`` when ``j != i`` and ``j`` does not
    contain class ``c_i = gradcam_targets[i]``: ``targets[j] != c_i`` (class ids) or
    ``targets[j, c_i] == 0`` (multi-hot). Every qualifying ``j`` gets an independent uniform key,
    the others ``-1``, and the three largest keys are taken (one ``topk`` over an ``(N, N)``
    matrix, no loop over ``N``): a uniformly random ordered triple of distinct qualifying samples.
    See the module docstring for why this is the paper's distribution.

    Args:
        targets (Tensor): ``(N,)`` integer class ids, or ``(N, K)`` multi-hot (bool or numeric,
            nonzero = present).
        gradcam_targets (Tensor, optional): ``(N,)`` class regularised for each sample; defaults
            to ``targets`` for class ids and is required for multi-hot targets. ``-1`` means no
            class to exclude (every other sample qualifies).
        generator (torch.Generator, optional): source of the random keys (drawn on its device,
            then moved to ``targets.device``).

    Returns:
        ``(index, valid)``: ``index`` ``(N, 3)`` int64 batch positions of the distractors,
        ``valid`` ``(N,)`` bool, False for rows with fewer than 3 qualifying samples, whose
        ``index`` entries are ``-1``.

    Examples::

        >>> y = torch.tensor([0, 0, 1, 2, 3, 1])
        >>> index, valid = in_batch_distractors(y)
        >>> bool((y[index.clamp(min=0)] != y[:, None])[valid].all())
        True
    """
    targets = _as_targets(targets)
    n = targets.shape[0]
    device = targets.device
    k = targets.shape[1] if targets.dim() == 2 else None
    g = _as_gradcam_targets(gradcam_targets, targets, k)
    qualify = ~_contains_class(targets, g)
    qualify.fill_diagonal_(False)
    keys = _rand((n, n), generator, device).masked_fill_(~qualify, -1.0)
    take = min(NUM_DISTRACTORS, n)
    index = torch.full((n, NUM_DISTRACTORS), -1, dtype=torch.long, device=device)
    if take:
        index[:, :take] = keys.topk(take, dim=1).indices
    valid = qualify.sum(dim=1) >= NUM_DISTRACTORS
    index = index.masked_fill(~valid.unsqueeze(1), -1)
    return index, valid


def sample_present_classes(targets: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One class drawn uniformly among the present ones of each multi-hot row (-1 if none).

    The class to regularise for a multi-label sample (the GC loss explains one class per
    composite). Batched: random keys on the present entries, ``argmax``.

    Args:
        targets (Tensor): ``(N, K)`` multi-hot.
        generator (torch.Generator, optional): source of randomness.

    Returns:
        ``(N,)`` int64 class indices, ``-1`` for rows without any class.

    Examples::

        >>> targets = torch.tensor([[1, 0, 1], [0, 0, 0]])
        >>> c = sample_present_classes(targets)
        >>> c[0].item() in (0, 2), c[1].item()
        (True, -1)
    """
    targets = _as_targets(targets)
    if targets.dim() != 2:
        raise ValueError(f"targets must be (N, K) multi-hot, got shape {tuple(targets.shape)}")
    present = targets != 0
    keys = _rand(tuple(present.shape), generator, targets.device).masked_fill_(~present, -1.0)
    choice = keys.argmax(dim=1)
    return torch.where(present.any(dim=1), choice, torch.full_like(choice, -1))


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


def _current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", 0))


class DatasetDistractorSampler:
    r"""Draws distractor indices from the whole data set: uniform, distinct, seeded per stream.

    For a class ``c`` with positives ``P_c`` (the images labelled ``c``, or containing ``c``),
    the distractors of a sample regularised on ``c`` are three distinct images drawn uniformly
    from the complement of ``P_c``: the paper's distribution. The complement is never
    materialised: the sorted positives of every class are stored once, in one flat array
    (``M`` entries for class ids, one per label for multi-hot), and the ``r``-th complement
    image is ``r + #{j : P_c[j] - j <= r}``, found with one ``searchsorted`` for a whole batch.
    Three distinct ranks are drawn without replacement by the "skip the chosen ones" rule, so
    there is no rejection loop and no bias, for single- and multi-label data alike.

    Random streams: :meth:`sample` without a generator uses a stream seeded from
    ``(seed, rank, worker, epoch)`` (:class:`numpy.random.SeedSequence`): ``rank`` is the
    ``torch.distributed`` rank (or ``$RANK``) unless given, ``worker`` the DataLoader worker id
    (read in the worker), ``epoch`` the value of :meth:`set_epoch`. Equal tuples give equal
    draws; different ranks, workers or epochs give independent ones.

    Args:
        targets (Tensor or sequence): ``(M,)`` class ids (e.g. ``dataset.targets`` of
            :class:`~captum_consistency.data.ImageNetWithBoxes`) or ``(M, K)`` multi-hot (e.g.
            :attr:`CocoMultiLabel.targets`).
        seed (int): base seed.
        rank (int, optional): process rank; detected at the first draw when ``None``.
        num_classes (int, optional): ``K`` for class ids (default ``max + 1``).

    Examples::

        >>> sampler = DatasetDistractorSampler(train_set.targets, seed=0)
        >>> sampler.set_epoch(epoch)
        >>> idx = sampler.sample(torch.tensor([3, 7]))  # (2, 3) dataset indices
    """

    def __init__(
        self,
        targets: Union[Tensor, Sequence[int]],
        seed: int = 0,
        rank: Optional[int] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        t = _as_targets(targets).cpu()
        m = t.shape[0]
        if m == 0:
            raise ValueError("targets is empty: no image to draw distractors from")
        if t.dim() == 1:
            t = t.long()
            if int(t.min()) < 0:
                raise ValueError(f"class ids in targets must be >= 0, got {int(t.min())}")
            k = int(t.max()) + 1 if num_classes is None else int(num_classes)
            if int(t.max()) >= k:
                raise ValueError(f"targets holds class {int(t.max())} but num_classes is {k}")
            classes = t
            order = torch.argsort(classes, stable=True)  # images grouped by class, increasing
            positives = order
            pos_class = classes[order]
        else:
            k = t.shape[1]
            nz = (t != 0).t().nonzero()  # (L, 2) [class, image], sorted by class then image
            pos_class, positives = nz[:, 0], nz[:, 1]
        counts = torch.bincount(pos_class, minlength=k)
        seg_start = torch.zeros(k + 1, dtype=torch.long)
        seg_start[1:] = torch.cumsum(counts, 0)
        rank_in_class = torch.arange(len(positives)) - seg_start[pos_class]
        # q = (number of complement images before each positive), shifted per class so that the
        # flat array is sorted and one searchsorted serves every class.
        self._q = (positives - rank_in_class + pos_class * (m + 1)).contiguous()
        self._seg_start = seg_start
        self.counts = counts
        self.num_images = m
        self.num_classes = k
        self.seed = int(seed)
        self._rank = rank
        self.epoch = 0
        self._gen: Optional[torch.Generator] = None
        self._gen_key: Optional[Tuple[int, int, int]] = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_gen"], state["_gen_key"] = None, None  # each worker builds its own stream
        return state

    @property
    def rank(self) -> int:
        return _current_rank() if self._rank is None else int(self._rank)

    def set_epoch(self, epoch: int) -> None:
        """Selects the stream of ``epoch`` (call it every epoch, like DistributedSampler's).

        Args:
            epoch (int): the epoch about to start.
        """
        self.epoch = int(epoch)

    def stream_seed(self, worker: Optional[int] = None, epoch: Optional[int] = None, rank: Optional[int] = None) -> int:
        """The 63-bit seed of the stream ``(seed, rank, worker, epoch)``.

        ``worker`` is the DataLoader worker id, ``None`` (the default) for the current process:
        the worker id inside a worker, the main process otherwise.

        Args:
            worker (int, optional): DataLoader worker id (``-1``: the main process).
            epoch (int, optional): the epoch; :attr:`epoch` when ``None``.
            rank (int, optional): the process rank; the detected rank when ``None``.

        Returns:
            int: a seed in ``[0, 2**63)``; equal arguments give equal seeds.
        """
        if worker is None:
            info = get_worker_info()
            worker = -1 if info is None else info.id
        epoch = self.epoch if epoch is None else epoch
        rank = self.rank if rank is None else rank
        words = [self.seed, int(rank), int(worker) + 1, int(epoch)]
        if min(words) < 0:
            raise ValueError(f"seed, rank, worker + 1 and epoch must be >= 0, got {words}")
        state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
        return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)

    def generator(self) -> torch.Generator:
        """The stream of the current ``(seed, rank, worker, epoch)``, created on first use.

        Returns:
            torch.Generator: a CPU generator seeded with :meth:`stream_seed`, reused until the
            rank, worker or epoch changes.
        """
        info = get_worker_info()
        key = (self.rank, -1 if info is None else info.id, self.epoch)
        if self._gen is None or self._gen_key != key:
            self._gen = torch.Generator().manual_seed(self.stream_seed(key[1], key[2], key[0]))
            self._gen_key = key
        return self._gen

    def sample(self, gradcam_targets: Union[Tensor, Sequence[int]], generator: Optional[torch.Generator] = None) -> Tensor:
        """Three distinct dataset indices per entry, none of which contains the entry's class.

        Args:
            gradcam_targets (Tensor): ``(n,)`` classes to exclude; ``-1`` excludes nothing.
            generator (torch.Generator, optional): a CPU generator; the sampler's own stream
                (:meth:`generator`) when ``None``.

        Returns:
            ``(n, 3)`` int64 CPU tensor of dataset indices.

        Raises:
            ValueError: a class whose complement holds fewer than 3 images.
        """
        g = gradcam_targets if isinstance(gradcam_targets, Tensor) else torch.as_tensor(gradcam_targets)
        if g.dtype.is_floating_point or g.dtype == torch.bool or g.dim() != 1:
            raise TypeError(f"gradcam_targets must be a 1-D integer tensor, got {g.dtype} {tuple(g.shape)}")
        g = g.cpu().long()
        n = g.shape[0]
        if n == 0:
            return torch.zeros(0, NUM_DISTRACTORS, dtype=torch.long)
        if int(g.min()) < -1 or int(g.max()) >= self.num_classes:
            raise ValueError(
                f"gradcam_targets must lie in -1..{self.num_classes - 1}, got [{int(g.min())}, {int(g.max())}]"
            )
        if generator is None:
            generator = self.generator()
        has_class = g >= 0
        gc = g.clamp(min=0)
        comp = torch.where(has_class, self.num_images - self.counts[gc], torch.full_like(g, self.num_images))
        if int(comp.min()) < NUM_DISTRACTORS:
            bad = sorted(set(g[comp < NUM_DISTRACTORS].tolist()))
            raise ValueError(
                f"class(es) {bad[:10]} are contained in all but fewer than {NUM_DISTRACTORS} of the "
                f"{self.num_images} images: not enough distractors"
            )
        raw = torch.randint(0, _MAX_INDEX, (n, NUM_DISTRACTORS), generator=generator, device="cpu")
        r = raw % (comp.unsqueeze(1) - torch.arange(NUM_DISTRACTORS))  # bounds comp, comp-1, comp-2
        # Three distinct ranks in [0, comp): each later draw skips the earlier ones in order.
        r0 = r[:, 0]
        r1 = r[:, 1] + (r[:, 1] >= r0).long()
        lo, hi = torch.minimum(r0, r1), torch.maximum(r0, r1)
        r2 = r[:, 2]
        r2 = r2 + (r2 >= lo).long()
        r2 = r2 + (r2 >= hi).long()
        ranks = torch.stack([r0, r1, r2], dim=1)  # (n, 3) ranks within the complement
        # Rank -> dataset index: add the number of positives before it (one searchsorted).
        shifted = ranks + (gc * (self.num_images + 1)).unsqueeze(1)
        before = torch.searchsorted(self._q, shifted, right=True) - self._seg_start[gc].unsqueeze(1)
        before = before * has_class.unsqueeze(1).long()
        return ranks + before


def _image_of(sample: Any) -> Tensor:
    image = getattr(sample, "image", None)
    if image is None and isinstance(sample, (tuple, list)) and sample:
        image = sample[0]
    if image is None and isinstance(sample, Tensor):
        image = sample
    if not isinstance(image, Tensor):
        raise TypeError(
            "the dataset must return tensors (give it a transform that ends in a tensor), or "
            f"samples with an .image tensor, got {type(sample).__name__}"
        )
    return image


class DistractorFallback:
    """Loads data-set distractors for the samples of a batch that lack in-batch ones.

    A callable for :func:`gather_distractors`: ``fallback(gradcam_targets) -> (m, 3, C, H, W)``.
    Indices come from a :class:`DatasetDistractorSampler`, images from ``dataset[i]`` (which must
    apply the training transform so that shapes match the batch). Undecodable images
    (``None`` samples) are redrawn, up to ``max_tries`` times.

    Args:
        dataset (Dataset): the training set (items: tensors, ``(image, target)`` tuples, or
            samples with an ``.image``).
        sampler (DatasetDistractorSampler): built on ``dataset.targets``.
        max_tries (int): redraws allowed for an undecodable image.

    Attributes:
        num_loaded (int): distractor images loaded so far (to report how often the fallback is
            used).

    Examples::

        >>> fallback = DistractorFallback(train_set, DatasetDistractorSampler(train_set.targets))
        >>> z = fallback(torch.tensor([3, 7]))  # (2, 3, C, H, W), none of class 3 (resp. 7)
    """

    def __init__(self, dataset: Dataset, sampler: DatasetDistractorSampler, max_tries: int = 10) -> None:
        if not isinstance(sampler, DatasetDistractorSampler):
            raise TypeError(f"sampler must be a DatasetDistractorSampler, got {type(sampler).__name__}")
        self.dataset = dataset
        self.sampler = sampler
        self.max_tries = int(max_tries)
        self.num_loaded = 0

    def load(self, index: int, gradcam_target: int) -> Tensor:
        """Loads ``dataset[index]``, redrawing a distractor of the class while it is undecodable.

        Args:
            index (int): the data-set index drawn by the sampler.
            gradcam_target (int): the regularised class (for the redraws).

        Returns:
            Tensor: the image ``(C, H, W)``.

        Raises:
            RuntimeError: ``max_tries`` draws in a row were undecodable.
        """
        for _ in range(self.max_tries):
            sample = self.dataset[index]
            if sample is not None:
                self.num_loaded += 1
                return _image_of(sample)
            index = int(self.sampler.sample(torch.tensor([gradcam_target]))[0, 0])
        raise RuntimeError(f"no decodable distractor found in {self.max_tries} draws (class {gradcam_target})")

    def __call__(self, gradcam_targets: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        g = torch.as_tensor(gradcam_targets)
        if g.dtype == torch.bool or g.is_floating_point() or g.is_complex():
            raise TypeError(f"gradcam_targets must hold integer class ids, got dtype {g.dtype}")
        g = g.cpu().long()
        index = self.sampler.sample(g, generator)
        images = [
            self.load(int(i), int(c))
            for row, c in zip(index.tolist(), g.tolist())
            for i in row
        ]
        if not images:
            raise ValueError("gradcam_targets is empty")
        return torch.stack(images).view(len(g), NUM_DISTRACTORS, *images[0].shape)


def gather_distractors(
    images: Tensor,
    targets: Tensor,
    gradcam_targets: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    fallback: Optional[Callable[[Tensor], Tensor]] = None,
    return_index: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    r"""The ``(N, 3, C, H, W)`` distractors of a batch, taken from the batch itself.

    Uses :func:`in_batch_distractors`: one gather, no image decoded. The rows with fewer than
    three qualifying batch mates get theirs from ``fallback`` (a
    :class:`DistractorFallback`, or any callable ``gradcam_targets (m,) -> (m, 3, C, H, W)``).
    Both paths draw from the paper's distribution: a uniform triple of distinct training images
    that do not contain the regularised class (see the module docstring for the argument).

    Args:
        images (Tensor): ``(N, C, H, W)`` the batch (any device).
        targets (Tensor): ``(N,)`` class ids or ``(N, K)`` multi-hot, on any device.
        gradcam_targets (Tensor, optional): ``(N,)`` regularised classes (default ``targets``
            for class ids; required for multi-hot).
        generator (torch.Generator, optional): source of randomness.
        fallback (callable, optional): source of distractors for the rows without enough
            qualifying batch mates.
        return_index (bool): also return the ``(index, valid)`` of :func:`in_batch_distractors`.

    Returns:
        The ``(N, 3, C, H, W)`` distractors on ``images.device``, ready for
        :func:`~captum_consistency.compose_grid`; with ``return_index``, the tuple
        ``(distractors, index, valid)``.

    Raises:
        ValueError: some rows lack in-batch distractors and no ``fallback`` was given; the
            message says how many.

    Examples::

        >>> fallback = DistractorFallback(train_set, DatasetDistractorSampler(train_set.targets))
        >>> z = gather_distractors(x, y, fallback=fallback)
        >>> composite, cells = compose_grid(x, z, return_cells=True)
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    # The choice runs where the targets are: CPU targets (as the loader gives them) keep the
    # training step free of host-device synchronisations; only the index travels, asynchronously.
    targets = _as_targets(targets)
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} rows but images has {images.shape[0]}")
    if gradcam_targets is not None:
        gradcam_targets = torch.as_tensor(gradcam_targets).to(targets.device)
    index, valid = in_batch_distractors(targets, gradcam_targets, generator)
    out = images[index.clamp(min=0).to(images.device, non_blocking=True)]  # (N, 3, C, H, W)
    missing = (~valid).nonzero().squeeze(1)
    if missing.numel():
        n_missing = int(missing.numel())
        if fallback is None:
            raise ValueError(
                f"{n_missing} of {images.shape[0]} samples have fewer than {NUM_DISTRACTORS} "
                "batch mates without their class; pass fallback=DistractorFallback(dataset, "
                "DatasetDistractorSampler(dataset.targets)) or use a larger batch"
            )
        g = targets if gradcam_targets is None else gradcam_targets
        extra = fallback(g[missing])
        expected = (n_missing, NUM_DISTRACTORS) + tuple(images.shape[1:])
        if not isinstance(extra, Tensor) or tuple(extra.shape) != expected:
            raise ValueError(f"fallback must return a tensor of shape {expected}, got {getattr(extra, 'shape', type(extra))}")
        out[missing.to(out.device)] = extra.to(device=out.device, dtype=out.dtype)
    return (out, index, valid) if return_index else out


class DatasetWithDistractors(Dataset):
    """The authors' scheme (``--distractors dataset``): each item brings its three distractors.

    ``item = (sample, distractors (3, C, H, W), gradcam_target)``: the regularised class is the
    sample's label, or for multi-hot targets a present class drawn uniformly (``-1`` when there
    is none); the distractors come from ``sampler`` in the loader worker, on the worker's own
    stream (see :class:`DatasetDistractorSampler`). Four images are decoded per item: use
    :func:`gather_distractors` unless the batch is too small for in-batch distractors.
    Batch with :func:`collate_with_distractors`.

    Args:
        dataset (Dataset): the training set; items expose ``.image`` and ``.target`` (the
            library's samples) or are ``(image, target)`` tuples.
        sampler (DatasetDistractorSampler): built on ``dataset.targets``.
        max_tries (int): redraws allowed for an undecodable distractor.

    Examples::

        >>> sampler = DatasetDistractorSampler(train_set.targets, seed=0)
        >>> data = DatasetWithDistractors(train_set, sampler)
        >>> loader = DataLoader(data, batch_size=64, shuffle=True, num_workers=8,
        ...     collate_fn=functools.partial(collate_with_distractors, collate_fn=train_set.collate_fn))
        >>> for batch, distractors, gradcam_targets in loader:
        ...     out = loss_fn(batch.images, batch.targets, distractors, gradcam_targets=gradcam_targets)
    """

    def __init__(self, dataset: Dataset, sampler: DatasetDistractorSampler, max_tries: int = 10) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self._loader = DistractorFallback(dataset, sampler, max_tries)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        if sample is None:
            return None
        target = getattr(sample, "target", None)
        if target is None and isinstance(sample, (tuple, list)) and len(sample) > 1:
            target = sample[1]
        t = torch.as_tensor(target)
        if t.dim() == 0:
            g = int(t)
        else:
            g = int(sample_present_classes(t.unsqueeze(0), self.sampler.generator())[0])
        distractors = self._loader(torch.tensor([g]), self.sampler.generator())[0]
        return sample, distractors, g


def collate_with_distractors(
    batch: Sequence[Optional[Tuple[Any, Tensor, int]]],
    collate_fn: Optional[Callable[[List[Any]], Any]] = None,
) -> Tuple[Any, Tensor, Tensor]:
    """Collates :class:`DatasetWithDistractors` items: ``(batch, (N, 3, C, H, W), (N,))``.

    ``collate_fn`` collates the inner samples (the dataset's ``collate_fn``, e.g.
    :func:`~captum_consistency.data.collate_image_samples`, by default
    :func:`torch.utils.data.default_collate`); ``None`` items are dropped (and counted by the
    library's collate functions when they are passed through: ``skipped``).
    Use ``functools.partial(collate_with_distractors, collate_fn=train_set.collate_fn)``.

    Args:
        batch (sequence): items of :class:`DatasetWithDistractors` (``None`` for skipped ones).
        collate_fn (callable, optional): collates the inner samples.

    Returns:
        ``(inner, distractors, gradcam_targets)``: the collated samples, the
        ``(N, 3, C, H, W)`` distractors and the ``(N,)`` int64 regularised classes.

    Examples::

        >>> collate = functools.partial(collate_with_distractors, collate_fn=train_set.collate_fn)
        >>> batch, distractors, gradcam_targets = collate([data[0], data[1], data[2], data[3]])
    """

    kept = [b for b in batch if b is not None]
    if collate_fn is None:
        from torch.utils.data import default_collate

        collate_fn = default_collate
        inner = collate_fn([b[0] for b in kept])
    else:
        inner = collate_fn([b[0] for b in kept] + [None] * (len(batch) - len(kept)))
    if not kept:
        return inner, torch.empty(0), torch.empty(0, dtype=torch.long)
    distractors = torch.stack([b[1] for b in kept])
    gradcam_targets = torch.tensor([int(b[2]) for b in kept], dtype=torch.long)
    return inner, distractors, gradcam_targets
