r"""A procedural spurious-context benchmark with exact ground truth: :class:`SpuriousContextShapes`.

Every image holds one object, a shape of one of ``K`` classes drawn with :mod:`skimage.draw` at a
random position, scale, rotation and colour on a cluttered background, and next to it a *context
cue*: a small striped patch whose stripe orientation and hue identify a class. In the training
split the cue next to an object of class ``y`` is the cue of class ``y`` with probability
``cue_strength`` and the cue of another class otherwise, so a classifier can score well by
reading the cue instead of the shape (a hand next to a fish). In the test split the cue class is
drawn uniformly, independent of the object class; each test image is flagged cue-consistent (cue
class = object class) or cue-conflicting. Reliance on context is then measured directly: by the
accuracy gap between the two subsets, by the saliency mass on the cue mask, and by the Content
Heatmap against the exact object mask.

Generator, per image ``i`` of a split (all draws are seeded, see *Determinism*):

1. **Labels.** Object class ``y ~ U{0..K-1}``. Cue class ``c``: train/val: ``c = y`` with
   probability ``cue_strength``, otherwise uniform over the ``K - 1`` other classes; test:
   ``c ~ U{0..K-1}`` independent of ``y``. A *stray cue* of a uniform class appears with
   probability ``stray_cue_prob`` somewhere away from the object, so cues of every class also
   occur in images of other classes (and distractors of a 2x2 composite carry them).
2. **Background.** A flat grey level ``U(0.3, 0.6)``; with ``clutter > 0`` a faint tint and
   gradient, ``Poisson(8 clutter)`` low-contrast, unsaturated ellipses (each shifts the grey level
   by at most 0.06, overlaps add up), ``Poisson(6 clutter)`` anti-aliased lines of contrast 0.08
   to 0.15 and uniform pixel noise of std ``0.03 clutter``.
3. **Object.** The class shape (:attr:`SHAPES`, in order: disk, square, triangle, star, cross,
   ring, crescent, bar, hourglass, chevron) of circumradius ``U(object_size) image_size``
   (default ``U(0.13, 0.25)``), random
   rotation and position, fully inside the image, filled with a saturated colour of random hue
   (shared by all classes, so colour says nothing about the class) and a mild linear shading.
4. **Cue.** A square patch of side ``round(0.17 image_size)`` with stripes of period
   ``side / 3.5`` at angle ``180 c / K`` degrees (jitter under 3 degrees, random phase),
   alternating hue ``c / K`` and near-black, placed 1 to ``round(0.04 image_size)`` pixels
   beside the object's bounding box on a random side that fits, in an image drawn with
   probability ``cue_prob`` (default 1). It never overlaps the object, and neither does the
   stray cue.
5. The image is quantised to 8 bits, like a decoded photograph.

Ground truth per image: the object's exact pixel mask (the drawn pixels; the object is opaque and
drawn over the clutter, so no background pixel is inside it) and its tight box, the cue's mask
and box, the stray cue's mask, the cue class and the consistency flag.

Determinism: the labels of image ``i`` come from a SplitMix64 hash of ``(seed, split, i)``
(vectorised, so :attr:`~SpuriousContextShapes.targets` costs no rendering); its geometry and its
clutter come from two ``numpy.random.Generator(PCG64(SeedSequence([seed, split_id, i, s])))``
streams. Image ``i`` of ``(seed, split)`` is therefore the same whatever ``length``, cache or
worker process, and the geometry does not depend on ``clutter``.
"""

from __future__ import annotations

import copy
import operator
from numbers import Integral, Real
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from captum_consistency.data._shape_rendering import (
    _MAX_RADIUS_WITH_CUE,
    _RADIUS_RANGE,
    _U_CUE_CLASS,
    _U_CUE_KEEP,
    _U_CUE_PRESENT,
    _U_LABEL,
    _U_STRAY,
    _U_STRAY_CLASS,
    SHAPES,
    _check_object_size,
    _hash_uniform,
    render,
)

__all__ = ["SpuriousContextShapes", "SyntheticSample", "SHAPES"]

SPLITS: Dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTHS: Dict[str, int] = {"train": 10_000, "val": 1_000, "test": 2_000}
MIN_IMAGE_SIZE = 32


class SyntheticSample(NamedTuple):
    """One annotated image of :class:`SpuriousContextShapes`.

    A ``NamedTuple``, so ``torch.utils.data.default_collate`` batches it field by field (a batch
    is a ``SyntheticSample`` of stacked tensors).

    Attributes:
        image (Tensor): ``(3, H, W)`` float32, normalised or in [0, 1] as the data set's
            ``normalize`` says.
        label (int): object class.
        mask (Tensor): ``(H, W)`` bool, exactly the object's drawn pixels.
        box (Tensor): ``(4,)`` int64 ``(x1, y1, x2, y2)``, tight bounds of ``mask`` in pixel
            indices, ``x2``/``y2`` inclusive (the convention of
            :func:`torchvision.ops.masks_to_boxes`).
        cue_mask (Tensor): ``(H, W)`` bool, the context cue beside the object.
        cue_box (Tensor): ``(4,)`` int64, box of ``cue_mask`` (same convention).
        cue_label (int): class whose cue sits beside the object.
        cue_consistent (bool): ``cue_label == label``.
        stray_mask (Tensor): ``(H, W)`` bool, the stray cue (all False when there is none).
        stray_label (int): class of the stray cue, ``-1`` when there is none.
        index (int): index of the sample in its split.

    Examples::

        >>> s = SpuriousContextShapes("test", num_classes=4, seed=0).sample(0)
        >>> s.image.shape, s.mask.shape, s.mask.dtype
        (torch.Size([3, 64, 64]), torch.Size([64, 64]), torch.bool)
        >>> bool((s.mask & s.cue_mask).any())  # the cue never overlaps the object
        False
    """

    image: Tensor
    label: int
    mask: Tensor
    box: Tensor
    cue_mask: Tensor
    cue_box: Tensor
    cue_label: int
    cue_consistent: bool
    stray_mask: Tensor
    stray_label: int
    index: int


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class SpuriousContextShapes(Dataset):
    r"""Procedural shapes with a class-correlated context cue, exact masks and a cue-independent test.

    See the module docstring (:mod:`captum_consistency.data.synthetic`) for the generator. Each
    object class ``y`` is one shape of :data:`SHAPES`; each class also owns a cue (stripes at
    ``180 y / K`` degrees in hue ``y / K``) drawn beside the object. In ``"train"`` and
    ``"val"`` the cue matches the object class with probability ``cue_strength``, so

    .. math::

        P(\text{cue} = c \mid y) = p\,[c = y] + \frac{1 - p}{K - 1}\,[c \neq y],

    while in ``"test"`` it is uniform, :math:`P(\text{cue} = c \mid y) = 1 / K`, and about
    ``(K - 1) / K`` of the test images are cue-conflicting. Images are rendered on the fly in
    ``__getitem__`` (no files), optionally memoised.

    Args:
        split (str): ``"train"`` (cue correlated), ``"val"`` (same distribution as train, other
            images) or ``"test"`` (cue independent of the class). Default ``"train"``.
        num_classes (int): number of object classes ``K``, 2 to ``len(SHAPES)`` (10). Default 4.
        image_size (int): side of the square images, at least 32. Default 64.
        cue_strength (float): probability in [0, 1] that the cue matches the object class in
            train/val (``1 / K`` makes it uninformative; ignored by ``"test"``). Default 0.9.
        stray_cue_prob (float): probability in [0, 1] of an extra cue of a uniformly drawn class
            placed at least ``side / 2`` pixels away from the object. Default 0.25.
        clutter (float): background clutter level in [0, 1]; 0 gives a flat grey background.
            Default 0.5.
        length (int, optional): number of images in the split; default 10000 (train), 1000
            (val), 2000 (test).
        cue_prob (float): probability in [0, 1] that an image has the context cue beside its
            object. ``0`` gives a plain shape-recognition data set with exact masks (the
            quickstart's ``shapes`` benchmark); an image without a cue has ``cue_label = -1``,
            an empty ``cue_mask`` and ``cue_box = (-1, -1, -1, -1)``, and is neither
            cue-consistent nor cue-conflicting. The cue's geometry is drawn either way, so
            every other pixel is the same whatever ``cue_prob``. Default 1.
        object_size (pair of float): range ``(min, max)`` of the object's circumradius as a
            fraction of the image side, ``0.05 <= min <= max <= 0.45``; with a cue
            (``cue_prob > 0``) at most 0.25, to leave room for it. Default ``(0.13, 0.25)``.
        seed (int): non-negative seed of the whole data set. Default 0.
        normalize (bool): return images standardised with :attr:`mean` and :attr:`std` (True,
            default) or in [0, 1] (False).
        cache (bool): memoise rendered samples in memory (each ``DataLoader`` worker keeps its own
            cache unless ``persistent_workers``; about 16 KB per 64x64 image). Default False.
        annotations (bool): make ``__getitem__`` return a :class:`SyntheticSample` instead of
            ``(image, label)``; see also :meth:`with_annotations`. Default False.

    Attributes:
        classes (list of str): class names (:data:`SHAPES` ``[:K]``).
        targets (list of int): object class of every image, computed without rendering.
        cue_targets (list of int): class of the cue beside every object, without rendering.
        mean, std (tuple of float): per-channel statistics used by ``normalize`` (measured on
            the default generator and rounded).

    Examples::

        >>> from torch.utils.data import DataLoader
        >>> from captum_consistency.data import SpuriousContextShapes
        >>> train = SpuriousContextShapes("train", num_classes=4, cue_strength=0.9, seed=0)
        >>> image, label = train[0]              # (3, 64, 64) float32, int
        >>> test = SpuriousContextShapes("test", num_classes=4, seed=0)
        >>> s = test.sample(0)                   # SyntheticSample with masks, boxes and cue
        >>> s.mask.shape, s.box, s.cue_consistent
        >>> conflicting = torch.utils.data.Subset(test, test.conflicting_indices())
        >>> for batch in DataLoader(test.with_annotations(), batch_size=64):
        ...     batch.image, batch.label, batch.mask     # stacked by default_collate
    """

    #: Per-channel mean and std of the default generator (``clutter=0.5``; measured 0.447 and
    #: 0.137 to 0.144 for 4 and 10 classes), rounded and shared by all knobs.
    mean: Tuple[float, float, float] = (0.447, 0.447, 0.447)
    std: Tuple[float, float, float] = (0.14, 0.14, 0.14)

    def __init__(
        self,
        split: str = "train",
        num_classes: int = 4,
        image_size: int = 64,
        cue_strength: float = 0.9,
        stray_cue_prob: float = 0.25,
        clutter: float = 0.5,
        length: Optional[int] = None,
        cue_prob: float = 1.0,
        object_size: Tuple[float, float] = _RADIUS_RANGE,
        seed: int = 0,
        normalize: bool = True,
        cache: bool = False,
        annotations: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, Integral):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be between 2 and {len(SHAPES)}, got {num_classes}")
        if isinstance(image_size, bool) or not isinstance(image_size, Integral):
            raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be at least {MIN_IMAGE_SIZE} to draw objects and cues, got {image_size}"
            )
        if length is None:
            length = DEFAULT_LENGTHS[split]
        if isinstance(length, bool) or not isinstance(length, Integral) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")

        self.split = split
        self.split_id = SPLITS[split]
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.cue_strength = _check_probability("cue_strength", cue_strength)
        self.stray_cue_prob = _check_probability("stray_cue_prob", stray_cue_prob)
        self.clutter = _check_probability("clutter", clutter)
        self.cue_prob = _check_probability("cue_prob", cue_prob)
        self.object_size = _check_object_size(object_size)
        if self.cue_prob > 0 and self.object_size[1] > _MAX_RADIUS_WITH_CUE:
            raise ValueError(
                f"object_size max {self.object_size[1]} leaves no room for the cue beside the "
                f"object: use at most {_MAX_RADIUS_WITH_CUE} or cue_prob=0"
            )
        self.length = int(length)
        self.seed = int(seed)
        self.normalize = bool(normalize)
        self.annotations = bool(annotations)
        self.classes: List[str] = list(SHAPES[: self.num_classes])
        self._cache: Optional[Dict[int, dict]] = {} if cache else None

        labels, cues, strays = self._sample_labels(np.arange(self.length))
        self._labels, self._cues, self._strays = labels, cues, strays
        self.targets: List[int] = labels.tolist()
        self.cue_targets: List[int] = cues.tolist()
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    # ---------------------------------------------------------------- labels (no rendering)

    def _sample_labels(self, index: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Object class, cue class and stray-cue class (-1: none) of each index, vectorised."""
        k = self.num_classes

        def u(stream: int) -> np.ndarray:
            return _hash_uniform(self.seed, self.split_id, index, stream)

        labels = np.minimum((u(_U_LABEL) * k).astype(np.int64), k - 1)
        if self.split == "test":
            cues = np.minimum((u(_U_CUE_CLASS) * k).astype(np.int64), k - 1)
        else:
            other = labels + 1 + np.minimum((u(_U_CUE_CLASS) * (k - 1)).astype(np.int64), k - 2)
            cues = np.where(u(_U_CUE_KEEP) < self.cue_strength, labels, other % k)
        # A separate stream, so the cue classes of the images that keep their cue do not
        # depend on cue_prob.
        cues = np.where(u(_U_CUE_PRESENT) < self.cue_prob, cues, -1)
        stray = np.minimum((u(_U_STRAY_CLASS) * k).astype(np.int64), k - 1)
        strays = np.where(u(_U_STRAY) < self.stray_cue_prob, stray, -1)
        return labels, cues, strays

    @property
    def cue_consistent(self) -> Tensor:
        """``(N,)`` bool: the cue beside the object is the cue of its class (no rendering)."""
        return torch.from_numpy(self._labels == self._cues)

    def consistent_indices(self) -> Tensor:
        """Indices of the cue-consistent images, e.g. for ``torch.utils.data.Subset``.

        Returns:
            Tensor: int64 ``(n,)`` indices, increasing (no image is rendered).
        """
        return torch.from_numpy(np.flatnonzero(self._labels == self._cues))

    def conflicting_indices(self) -> Tensor:
        """Indices of the cue-conflicting images (cue of another class beside the object).

        Returns:
            Tensor: int64 ``(n,)`` indices, increasing (no image is rendered).
        """
        return torch.from_numpy(np.flatnonzero((self._labels != self._cues) & (self._cues >= 0)))

    # ---------------------------------------------------------------- rendering

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, self.split_id, index, stream]))
        )

    def _render(self, index: int) -> dict:
        return render(
            index, int(self._labels[index]), int(self._cues[index]), int(self._strays[index]),
            self.image_size, self.num_classes, self.object_size, self.clutter,
            rng=self._rng(index, 0), clutter_rng=self._rng(index, 1),
        )

    def _record(self, index: int) -> dict:
        try:
            if isinstance(index, bool):
                raise TypeError
            index = operator.index(index)  # ints, numpy ints, 0-d integer tensors (Subset)
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}") from None
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a split of length {self.length}")
        index = int(index)
        if self._cache is not None:
            rec = self._cache.get(index)
            if rec is None:
                rec = self._cache[index] = self._render(index)
            return rec
        return self._render(index)

    def _image_tensor(self, rec: dict) -> Tensor:
        image = torch.from_numpy(rec["image"]).permute(2, 0, 1).float().div_(255.0)
        if self.normalize:
            image = image.sub_(self._mean).div_(self._std)
        return image

    # ---------------------------------------------------------------- public access

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Union[Tuple[Tensor, int], SyntheticSample]:
        """``(image, label)``, or a :class:`SyntheticSample` when ``annotations`` is set."""
        if self.annotations:
            return self.sample(index)
        rec = self._record(index)
        return self._image_tensor(rec), rec["label"]

    def sample(self, index: int) -> SyntheticSample:
        """Image ``index`` with its ground truth (masks, boxes, cue class, consistency flag).

        Args:
            index (int): the image's index in the split.

        Returns:
            SyntheticSample: the image (as ``__getitem__`` returns it) and its annotations.
        """
        rec = self._record(index)
        return SyntheticSample(
            image=self._image_tensor(rec),
            label=rec["label"],
            mask=torch.from_numpy(rec["mask"].copy()),
            box=torch.from_numpy(rec["box"].copy()),
            cue_mask=torch.from_numpy(rec["cue_mask"].copy()),
            cue_box=torch.from_numpy(rec["cue_box"].copy()),
            cue_label=rec["cue_label"],
            cue_consistent=rec["cue_label"] == rec["label"],
            stray_mask=torch.from_numpy(rec["stray_mask"].copy()),
            stray_label=rec["stray_label"],
            index=rec["index"],
        )

    def with_annotations(self, annotations: bool = True) -> "SpuriousContextShapes":
        """A view of this data set whose ``__getitem__`` returns :class:`SyntheticSample` s.

        The view shares the cache; ``DataLoader``'s default collate stacks the samples.

        Args:
            annotations (bool): ``True`` for annotated samples, ``False`` for
                ``(image, label)`` pairs.

        Returns:
            SpuriousContextShapes: a shallow copy with ``annotations`` set; ``self`` is
            unchanged.
        """
        view = copy.copy(self)
        view.annotations = bool(annotations)
        return view

    def rgb(self, index: int) -> np.ndarray:
        """Image ``index`` as an ``(H, W, 3)`` float32 array in [0, 1], e.g. for
        ``pytorch_grad_cam.utils.image.show_cam_on_image``.

        Args:
            index (int): the image's index in the split.

        Returns:
            numpy.ndarray: ``(H, W, 3)`` float32 in [0, 1], not normalised.
        """

        return self._record(index)["image"].astype(np.float32) / 255.0

    def denormalize(self, images: Tensor) -> Tensor:
        """Maps images returned by this data set back to [0, 1] (identity if not ``normalize``).

        Args:
            images (Tensor): ``(3, H, W)`` or ``(N, 3, H, W)``, on any device.

        Returns:
            Tensor of the same shape, clamped to [0, 1].
        """
        if not isinstance(images, Tensor) or images.dim() not in (3, 4) or images.shape[-3] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (3, H, W) or (N, 3, H, W) tensor, got {shape}")
        if not self.normalize:
            return images.clamp(0.0, 1.0)
        mean = self._mean.to(device=images.device, dtype=images.dtype)
        std = self._std.to(device=images.device, dtype=images.dtype)
        return (images * std + mean).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, cue_strength={self.cue_strength}, "
            f"stray_cue_prob={self.stray_cue_prob}, cue_prob={self.cue_prob}, "
            f"object_size={self.object_size}, clutter={self.clutter}, length={self.length}, "
            f"seed={self.seed})"
        )
