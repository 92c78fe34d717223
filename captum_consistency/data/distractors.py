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

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from captum_consistency.composition import NUM_DISTRACTORS
from captum_consistency.data._grouping import shared_composite_groups
from captum_consistency.data._sampler import DatasetDistractorSampler
from captum_consistency.data._targets import (
    _as_gradcam_targets,
    _as_targets,
    _rand,
    check_gradcam_targets,
    sample_present_classes,
)

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


def _contains_class(targets: Tensor, g: Tensor) -> Tensor:
    """``(N, N)`` bool, ``[i, j]``: sample ``j`` contains class ``g[i]`` (never for ``g[i] == -1``)."""
    if targets.dim() == 1:
        return targets.unsqueeze(0) == g.unsqueeze(1)
    present = targets != 0
    return present[:, g.clamp(min=0)].t() & (g >= 0).unsqueeze(1)


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
        g = check_gradcam_targets(gradcam_targets, num_classes=self.sampler.num_classes).cpu().long()
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
