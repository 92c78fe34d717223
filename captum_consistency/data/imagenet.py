"""ImageNet (or any ImageFolder tree) with the ILSVRC bounding boxes, for the paper's metrics.

The images follow torchvision's :class:`~torchvision.datasets.ImageFolder` layout
(``<root>/<split>/<wnid>/*.JPEG``); the boxes are the official ILSVRC2012 XML files (PASCAL VOC
format), one per image, named after the image's stem, in a separate folder (flat as for the
validation set, or in ``<wnid>/`` sub-folders as the training boxes unpack). Each sample carries
the boxes *of its label* in the pixel coordinates of the original image, so the Pointing Game and
the Content Heatmap can be computed on the union of the boxes after the saliency map has been
resized back to the image (Pillai & Pirsiavash, AAAI 2021, Sec. 4.3).

Everything that can go wrong on disk is handled explicitly: a missing XML, an XML without a box
of the image's class, a corrupt JPEG, an empty class folder, an XML whose ``<size>`` disagrees
with the image. Each is a clear error naming the file, or, where asked for, a skip that is
counted (``dataset.skipped`` at construction, ``batch.skipped`` for images that cannot be
decoded while loading).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets import ImageFolder

from captum_consistency.data._images import (
    _CORRUPT_POLICIES,
    _SKIP_CORRUPT_HINT,
    CorruptImageError,
    _load_or_skip,
    load_rgb,
)
from captum_consistency.data._voc import VocObject, parse_voc_xml
from captum_consistency.data.transforms import _stack_images

from captum_consistency.metrics import boxes_to_mask  # re-exported: one rasteriser for all

__all__ = [
    "ImageNetWithBoxes",
    "ImageSample",
    "ImageBatch",
    "collate_image_samples",
    "boxes_to_mask",
    "parse_voc_xml",
    "load_rgb",
    "CorruptImageError",
    "VocObject",
]

_MISSING_POLICIES = ("error", "skip", "empty")
_MISMATCH_POLICIES = ("error", "rescale")


class ImageSample(NamedTuple):
    """One sample of :class:`ImageNetWithBoxes`.

    Attributes:
        image: the transformed image (a ``(C, h, w)`` tensor with the library's transforms).
        target (int): class index into ``dataset.classes``.
        boxes (Tensor): ``(B, 4)`` float32 ``x1, y1, x2, y2`` of the boxes of class ``target``,
            in pixels of the original image (``B = 0`` without boxes).
        difficult (Tensor): ``(B,)`` bool ``difficult`` flags of the boxes.
        size (tuple of int): original ``(H, W)`` of the image.
        index (int): the sample's index in the dataset.

    Examples::

        >>> sample = val_set[0]
        >>> mask = boxes_to_mask(sample.boxes, sample.size, one_based=True)  # (H, W) union
    """

    image: Any
    target: int
    boxes: Tensor
    difficult: Tensor
    size: Tuple[int, int]
    index: int


class ImageBatch(NamedTuple):
    """A batch of :class:`ImageSample`, made by :func:`collate_image_samples`.

    Attributes:
        images (Tensor): ``(N, C, h, w)``.
        targets (Tensor): ``(N,)`` int64 class indices.
        boxes (list of Tensor): ``N`` tensors ``(B_i, 4)``, original pixel coordinates.
        difficult (list of Tensor): ``N`` bool tensors ``(B_i,)``.
        sizes (Tensor): ``(N, 2)`` int64 original ``(H, W)``.
        indices (Tensor): ``(N,)`` int64 dataset indices.
        skipped (int): samples of this batch dropped because their image could not be decoded
            (``on_corrupt="skip"``); add it up to report the count.

    Examples::

        >>> for batch in DataLoader(val_set, batch_size=32, collate_fn=val_set.collate_fn):
        ...     masks = boxes_to_mask(batch.boxes, tuple(batch.sizes[0].tolist()), one_based=True)
    """

    images: Tensor
    targets: Tensor
    boxes: List[Tensor]
    difficult: List[Tensor]
    sizes: Tensor
    indices: Tensor
    skipped: int


def collate_image_samples(batch: Sequence[Optional[ImageSample]]) -> ImageBatch:
    """Collates :class:`ImageSample` into an :class:`ImageBatch`, boxes kept as lists.

    ``None`` entries (images skipped with ``on_corrupt="skip"``) are dropped and counted in
    ``ImageBatch.skipped``; when every entry is ``None`` the batch is empty
    (``indices.numel() == 0``; ``images`` then has shape ``(0,)``): skip it, count its
    ``skipped``.

    Args:
        batch (sequence of ImageSample or None): the samples a DataLoader gathered.

    Returns:
        ImageBatch: images stacked, targets, sizes and indices as tensors, boxes and
        difficult flags as lists, and the count of ``None`` entries in ``skipped``.

    Raises:
        ValueError: images of different shapes (whole-image evaluation: use
            :class:`~captum_consistency.data.SizeGroupedBatchSampler`).

    Examples::

        >>> loader = DataLoader(val_set, batch_size=64, collate_fn=collate_image_samples)
        >>> batch = next(iter(loader))
        >>> batch.images.shape, len(batch.boxes), batch.skipped
    """
    kept = [s for s in batch if s is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        empty = torch.empty(0, dtype=torch.long)
        return ImageBatch(torch.empty(0), empty, [], [], torch.empty(0, 2, dtype=torch.long), empty, skipped)
    images = _stack_images([s.image for s in kept])
    return ImageBatch(
        images=images,
        targets=torch.tensor([int(s.target) for s in kept], dtype=torch.long),
        boxes=[s.boxes for s in kept],
        difficult=[s.difficult for s in kept],
        sizes=torch.tensor([tuple(s.size) for s in kept], dtype=torch.long),
        indices=torch.tensor([int(s.index) for s in kept], dtype=torch.long),
        skipped=skipped,
    )


def _check_policy(name: str, value: str, allowed: Tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _index_xml_files(boxes_dir: str) -> Dict[str, str]:
    """Maps each XML stem under ``boxes_dir`` (flat or one level of wnid folders) to its path."""
    index: Dict[str, str] = {}
    for dirpath, _, fnames in os.walk(boxes_dir, followlinks=True):
        for fname in fnames:
            stem, ext = os.path.splitext(fname)
            if ext.lower() == ".xml":
                index.setdefault(stem, os.path.join(dirpath, fname))
    return index


class ImageNetWithBoxes(ImageFolder):
    r"""ImageNet (or any :class:`~torchvision.datasets.ImageFolder` tree) with ILSVRC boxes.

    Reads ``<root>/<split>/<class>/<image>`` like :class:`~torchvision.datasets.ImageFolder`
    (classes are the sub-folders, sorted, never a fixed 1000) and, when ``boxes_dir`` is given,
    the PASCAL VOC XML file ``<boxes_dir>/[<class>/]<image stem>.xml`` of every image. The XMLs
    are parsed once, at construction, into flat arrays, so the workers of a
    :class:`~torch.utils.data.DataLoader` never touch them.

    Each item is an :class:`ImageSample` ``(image, target, boxes, difficult, size, index)``:
    the boxes are those whose ``<name>`` is the image's class, in the original image's pixel
    coordinates ``x1, y1, x2, y2`` as stored in the XML; ``size`` is the original ``(H, W)``.
    Use :attr:`collate_fn` (:func:`collate_image_samples`) in the DataLoader: it keeps the
    boxes as lists.

    Policies (all explicit, nothing silent):

    - ``on_missing_boxes`` -- an image with no XML, or whose XML has no box of its class:
      ``"error"`` (default) raises a :class:`FileNotFoundError` listing the files; ``"skip"``
      drops those images from the dataset and records them in :attr:`skipped`
      (``(path, reason)`` pairs, :attr:`num_skipped` of them); ``"empty"`` keeps them with zero
      boxes (for training splits, where only some images have boxes).
    - ``on_corrupt`` -- an image that cannot be decoded: ``"error"`` (default) raises
      :class:`CorruptImageError` naming the file; ``"skip"`` returns ``None`` for it (with a
      warning) and :func:`collate_image_samples` drops it and counts it in
      ``ImageBatch.skipped``.
    - ``on_size_mismatch`` -- an XML ``<size>`` different from the decoded image (typically a
      pre-resized copy of ImageNet): ``"error"`` (default) raises naming both files;
      ``"rescale"`` scales the boxes to the image file's pixels.
    - ``allow_empty`` -- a class folder without images: ``False`` (default) raises a
      :class:`FileNotFoundError` naming the folders; ``True`` keeps the class (so that class
      indices stay aligned with the training split) with no sample, listed in
      :attr:`empty_classes`.

    Args:
        root (str or PathLike): the folder that holds the split folders.
        split (str, optional): ``"val"`` or ``"train"`` (any sub-folder name works); ``None``
            reads the class folders directly from ``root``.
        boxes_dir (str or PathLike, optional): folder of the XML files; ``None`` gives samples
            without boxes (``B = 0``).
        transform (callable, optional): applied to the RGB PIL image, e.g.
            :func:`~captum_consistency.data.eval_transform`.
        classes (sequence of str, optional): the class list to use instead of the folders found,
            e.g. ``train_set.classes`` for the validation split, so that indices agree; a missing
            folder is an empty class, a folder not in the list is an error.
        on_missing_boxes (str): ``"error"``, ``"skip"`` or ``"empty"``.
        on_corrupt (str): ``"error"`` or ``"skip"``.
        on_size_mismatch (str): ``"error"`` or ``"rescale"``.
        allow_empty (bool): keep class folders that hold no image.
        loader (callable, optional): ``path -> PIL image``; :func:`load_rgb` by default.

    Attributes:
        classes (list of str): class folder names, sorted (or as given); index order.
        class_to_idx (dict): class name -> index.
        samples (list of (str, int)): ``(path, target)`` pairs, after skips.
        targets (list of int): the class index of every sample (cheap, for samplers).
        skipped (list of (str, str)): images dropped at construction, with the reason.
        empty_classes (list of str): classes without any image.

    Examples::

        >>> val = ImageNetWithBoxes("/data/imagenet", "val", boxes_dir="/data/imagenet/boxes/val",
        ...                         transform=eval_transform(224))
        >>> s = val[0]
        >>> s.image.shape, s.target, s.boxes, s.size
        (torch.Size([3, 448, 597]), 65, tensor([[111., 108., 441., 193.]]), (375, 500))
        >>> loader = DataLoader(val, batch_sampler=SizeGroupedBatchSampler(
        ...     val.original_sizes(), 64, short_side=448), collate_fn=val.collate_fn)
    """

    collate_fn = staticmethod(collate_image_samples)

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: Optional[str] = "val",
        boxes_dir: Optional[Union[str, os.PathLike]] = None,
        transform: Optional[Callable] = None,
        classes: Optional[Sequence[str]] = None,
        on_missing_boxes: str = "error",
        on_corrupt: str = "error",
        on_size_mismatch: str = "error",
        allow_empty: bool = False,
        loader: Optional[Callable[[str], Any]] = None,
    ) -> None:
        self.on_missing_boxes = _check_policy("on_missing_boxes", on_missing_boxes, _MISSING_POLICIES)
        self.on_corrupt = _check_policy("on_corrupt", on_corrupt, _CORRUPT_POLICIES)
        self.on_size_mismatch = _check_policy("on_size_mismatch", on_size_mismatch, _MISMATCH_POLICIES)
        folder = os.path.join(os.fspath(root), split) if split else os.fspath(root)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder not found: {folder} (root={root!s}, split={split!r})")
        if classes is not None:
            classes = [str(c) for c in classes]
            if not classes or len(set(classes)) != len(classes):
                raise ValueError("classes must be a non-empty sequence of distinct folder names")
        self._given_classes = classes
        super().__init__(folder, transform=transform, loader=loader or load_rgb, allow_empty=True)
        self.split = split

        counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes))
        self.empty_classes = [c for c, n in zip(self.classes, counts) if n == 0]
        if self.empty_classes and not allow_empty:
            paths = [os.path.join(folder, c) for c in self.empty_classes]
            raise FileNotFoundError(
                f"{len(paths)} class folder(s) hold no image: {', '.join(paths[:5])}"
                f"{' ...' if len(paths) > 5 else ''}; remove them, or pass allow_empty=True "
                "(--allow-empty-classes in the recipes) to keep the classes (indices unchanged) "
                "without samples"
            )

        self.boxes_dir = os.fspath(boxes_dir) if boxes_dir is not None else None
        self.skipped: List[Tuple[str, str]] = []
        n = len(self.samples)
        self._xml_sizes = np.zeros((n, 2), dtype=np.int64)
        if self.boxes_dir is None:
            self._box_offsets = np.zeros(n + 1, dtype=np.int64)
            self._box_data = np.zeros((0, 4), dtype=np.float32)
            self._box_difficult = np.zeros(0, dtype=bool)
            self._xml_paths: List[Optional[str]] = [None] * n
        else:
            self._load_boxes()

    # ImageFolder hook: a fixed class list (e.g. the training split's) instead of the folders.
    def find_classes(self, directory: Union[str, os.PathLike]) -> Tuple[List[str], Dict[str, int]]:
        given = getattr(self, "_given_classes", None)
        if given is None:
            return super().find_classes(directory)
        on_disk = {e.name for e in os.scandir(directory) if e.is_dir()}
        extra = sorted(on_disk - set(given))
        if extra:
            raise ValueError(
                f"{len(extra)} class folder(s) of {directory} are not in the given classes: "
                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}"
            )
        return list(given), {c: i for i, c in enumerate(given)}

    def _load_boxes(self) -> None:
        boxes_dir = self.boxes_dir
        assert boxes_dir is not None
        if not os.path.isdir(boxes_dir):
            raise FileNotFoundError(f"boxes_dir not found: {boxes_dir}")
        index = _index_xml_files(boxes_dir)
        keep: List[int] = []
        problems: List[Tuple[str, str]] = []
        offsets = [0]
        data: List[Tuple[float, float, float, float]] = []
        difficult: List[bool] = []
        xml_sizes: List[Tuple[int, int]] = []
        xml_paths: List[Optional[str]] = []
        for i, (path, target) in enumerate(self.samples):
            stem = os.path.splitext(os.path.basename(path))[0]
            xml = index.get(stem)
            wnid = self.classes[target]
            if xml is None:
                problem = f"no bounding-box XML {stem}.xml in {boxes_dir}"
                objects: List[VocObject] = []
                size = None
            else:
                objects, size = parse_voc_xml(xml)
                objects = [o for o in objects if o.name == wnid]
                problem = "" if objects else f"{xml} has no box of class {wnid}"
            if problem:
                problems.append((path, problem))
                if self.on_missing_boxes == "skip":
                    continue
            keep.append(i)
            data.extend(o.box for o in objects)
            difficult.extend(o.difficult for o in objects)
            offsets.append(len(data))
            xml_sizes.append(size or (0, 0))
            xml_paths.append(xml)
        if problems and self.on_missing_boxes == "error":
            listed = "; ".join(f"{p}: {why}" for p, why in problems[:5])
            raise FileNotFoundError(
                f"{len(problems)} image(s) of {self.root} have no usable boxes: {listed}"
                f"{' ...' if len(problems) > 5 else ''}. Pass on_missing_boxes='skip' to drop and "
                "count them, or 'empty' to keep them without boxes"
            )
        if self.on_missing_boxes == "skip":
            self.skipped = problems
            self.samples = [self.samples[i] for i in keep]
            self.imgs = self.samples
            self.targets = [s[1] for s in self.samples]
        self._box_offsets = np.asarray(offsets, dtype=np.int64)
        self._box_data = np.asarray(data, dtype=np.float32).reshape(-1, 4)
        self._box_difficult = np.asarray(difficult, dtype=bool)
        self._xml_sizes = np.asarray(xml_sizes, dtype=np.int64).reshape(-1, 2)
        self._xml_paths = xml_paths

    @property
    def num_skipped(self) -> int:
        """Number of images dropped at construction (``on_missing_boxes="skip"``)."""
        return len(self.skipped)

    def boxes(self, index: int) -> Tuple[Tensor, Tensor]:
        """The ``(B, 4)`` boxes and ``(B,)`` difficult flags of sample ``index``, as stored.

        Read from the arrays parsed at construction (no file access).

        Args:
            index (int): the sample's index.

        Returns:
            ``(boxes, difficult)``: float32 ``(B, 4)`` ``x1, y1, x2, y2`` in the XML's pixel
            coordinates and bool ``(B,)``; ``B = 0`` without boxes.
        """
        a, b = int(self._box_offsets[index]), int(self._box_offsets[index + 1])
        return (
            torch.from_numpy(self._box_data[a:b].copy()),
            torch.from_numpy(self._box_difficult[a:b].copy()),
        )

    def __getitem__(self, index: int) -> Optional[ImageSample]:  # type: ignore[override]
        path, target = self.samples[index]
        img = _load_or_skip(self.loader, path, self.on_corrupt)
        if img is None:
            return None
        size = (img.height, img.width)
        boxes, difficult = self.boxes(index)
        xml_size = tuple(int(v) for v in self._xml_sizes[index])
        if xml_size != (0, 0) and xml_size != size:
            if self.on_size_mismatch == "error":
                raise ValueError(
                    f"image {path} is {size[0]}x{size[1]} (HxW) but its XML {self._xml_paths[index]} "
                    f"says {xml_size[0]}x{xml_size[1]}; pass on_size_mismatch='rescale' to scale "
                    "the boxes to the image (e.g. for a resized copy of ImageNet)"
                )
            sx, sy = size[1] / xml_size[1], size[0] / xml_size[0]
            boxes = boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
        if self.transform is not None:
            img = self.transform(img)
        return ImageSample(img, target, boxes, difficult, size, index)

    def original_sizes(self, num_threads: int = 8) -> List[Tuple[int, int]]:
        """The original ``(H, W)`` of every sample, for :class:`SizeGroupedBatchSampler`.

        Taken from the XML ``<size>`` when available (a mismatch with the file raises in
        ``__getitem__`` unless ``on_size_mismatch="rescale"``, in which case the file's header is
        read), otherwise from the image header (PIL reads a few bytes, not the pixels), in
        ``num_threads`` threads. Unreadable images give ``(0, 0)`` with ``on_corrupt="skip"``
        and raise :class:`CorruptImageError` otherwise. Computed once and cached.

        Args:
            num_threads (int): threads reading image headers.

        Returns:
            list of (int, int): ``(H, W)`` per sample, in dataset order.
        """

        cached = getattr(self, "_original_sizes", None)
        if cached is not None:
            return list(cached)
        sizes: List[Optional[Tuple[int, int]]] = [None] * len(self.samples)
        trust_xml = self.on_size_mismatch == "error"
        todo = []
        for i in range(len(self.samples)):
            xs = (int(self._xml_sizes[i, 0]), int(self._xml_sizes[i, 1]))
            if trust_xml and xs != (0, 0):
                sizes[i] = xs
            else:
                todo.append(i)

        def header(i: int) -> Tuple[int, int]:
            path = self.samples[i][0]
            try:
                with Image.open(path) as im:
                    w, h = im.size
                return (h, w)
            except (OSError, SyntaxError, ValueError) as e:
                if self.on_corrupt == "skip":
                    return (0, 0)
                raise CorruptImageError(f"cannot read image header {path}: {e}; {_SKIP_CORRUPT_HINT}") from e

        if todo:
            with ThreadPoolExecutor(max(1, num_threads)) as pool:
                for i, s in zip(todo, pool.map(header, todo)):
                    sizes[i] = s
        self._original_sizes = [s for s in sizes if s is not None]
        return list(self._original_sizes)
