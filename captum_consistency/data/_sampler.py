r"""Distractors drawn from the whole data set: :class:`DatasetDistractorSampler`."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from captum_consistency.composition import NUM_DISTRACTORS
from captum_consistency.data._targets import _as_targets, check_gradcam_targets

__all__ = ["DatasetDistractorSampler"]

_MAX_INDEX = 2**62  # raw draws are reduced modulo the bound: bias below 2**-40 for 1M images


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
        g = check_gradcam_targets(gradcam_targets, num_classes=self.num_classes).cpu().long()
        n = g.shape[0]
        if n == 0:
            return torch.zeros(0, NUM_DISTRACTORS, dtype=torch.long)
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
