"""MS-COCO as a multi-label classification data set, with per-category union masks.

The annotations are read with pycocotools (``instances_*.json``). Each image gets a multi-hot
target over the file's categories, re-indexed contiguously ``0 .. K-1`` in increasing category id
(COCO's 80 categories have ids 1..90 with gaps; ``K`` comes from the file). For the paper's
metrics on MS-COCO (Pillai & Pirsiavash, AAAI 2021, Sec. 4.3: Pointing Game and Content Heatmap
on segmentation masks) each sample can also carry, for every category present in the image, the
union of the masks of its instances at the original image size: polygons, uncompressed RLE
(``iscrowd``) and compressed RLE all go through :mod:`pycocotools.mask`.

Only compact arrays are kept after construction (targets, file names, sizes, and with
``with_masks`` the segmentations serialised per image), so that DataLoader workers do not copy
the JSON's Python objects page by page.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from captum_consistency.data._images import _CORRUPT_POLICIES, _load_or_skip, load_rgb
from captum_consistency.data.transforms import _stack_images

__all__ = ["CocoMultiLabel", "CocoSample", "CocoBatch", "collate_coco_samples", "segmentation_to_rle"]

_EMPTY_POLICIES = ("skip", "keep", "error")


class CocoSample(NamedTuple):
    """One sample of :class:`CocoMultiLabel`.

    Attributes:
        image: the transformed image (a ``(C, h, w)`` tensor with the library's transforms).
        target (Tensor): ``(K,)`` float32 multi-hot vector over the categories.
        masks (Tensor or None): ``(P, H, W)`` bool, for each of the ``P`` categories present in
            the image, the union of its instance masks at the original size; ``None`` unless
            ``with_masks``.
        mask_labels (Tensor or None): ``(P,)`` int64 category indices of ``masks``, increasing
            (exactly the nonzero entries of ``target``).
        size (tuple of int): original ``(H, W)``.
        index (int): the sample's index in the dataset.

    Examples::

        >>> s = coco_val[0]  # CocoMultiLabel(..., with_masks=True)
        >>> for mask, label in zip(s.masks, s.mask_labels):  # one (H, W) mask per present class
        ...     print(coco_val.classes[label], int(mask.sum()))
    """

    image: Any
    target: Tensor
    masks: Optional[Tensor]
    mask_labels: Optional[Tensor]
    size: Tuple[int, int]
    index: int


class CocoBatch(NamedTuple):
    """A batch of :class:`CocoSample`, made by :func:`collate_coco_samples`.

    Attributes:
        images (Tensor): ``(N, C, h, w)``.
        targets (Tensor): ``(N, K)`` float32 multi-hot.
        masks (list of Tensor or None): ``N`` bool tensors ``(P_i, H_i, W_i)``.
        mask_labels (list of Tensor or None): ``N`` int64 tensors ``(P_i,)``.
        sizes (Tensor): ``(N, 2)`` int64 original ``(H, W)``.
        indices (Tensor): ``(N,)`` int64 dataset indices.
        skipped (int): samples of this batch dropped because their image could not be decoded.

    Examples::

        >>> loader = DataLoader(coco_val, batch_size=16, collate_fn=coco_val.collate_fn)
        >>> batch = next(iter(loader))
        >>> batch.targets.shape, len(batch.masks)
        (torch.Size([16, 80]), 16)
    """

    images: Tensor
    targets: Tensor
    masks: Optional[List[Tensor]]
    mask_labels: Optional[List[Tensor]]
    sizes: Tensor
    indices: Tensor
    skipped: int


def collate_coco_samples(
    batch: Sequence[Optional[CocoSample]], num_classes: Optional[int] = None, with_masks: Optional[bool] = None
) -> CocoBatch:
    """Collates :class:`CocoSample` into a :class:`CocoBatch`; masks stay lists.

    ``None`` entries (``on_corrupt="skip"``) are dropped and counted in ``CocoBatch.skipped``.
    When every entry is ``None`` the batch is empty: ``indices.numel() == 0``, ``targets`` of
    shape ``(0, num_classes)`` (``(0, 0)`` if ``num_classes`` is not given), ``images`` of shape
    ``(0,)``, ``masks`` an empty list if ``with_masks`` else ``None``. ``dataset.collate_fn``
    passes the data set's ``num_classes`` and ``with_masks``.

    Args:
        batch (sequence of CocoSample or None): the samples a DataLoader gathered.
        num_classes (int, optional): ``K``, the width of ``targets`` for an all-``None`` batch.
        with_masks (bool, optional): whether an all-``None`` batch has ``masks`` lists.

    Returns:
        CocoBatch: images stacked, targets ``(N, K)``, masks and labels as lists.

    Examples::

        >>> collate = functools.partial(collate_coco_samples, num_classes=80, with_masks=True)
        >>> loader = DataLoader(coco_val, batch_size=16, collate_fn=collate)  # = coco_val.collate_fn
    """
    kept = [s for s in batch if s is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        empty = torch.empty(0, dtype=torch.long)
        targets = torch.empty(0, int(num_classes or 0))
        masks = [] if with_masks else None
        labels = [] if with_masks else None
        return CocoBatch(torch.empty(0), targets, masks, labels, torch.empty(0, 2, dtype=torch.long), empty, skipped)
    with_masks = kept[0].masks is not None
    return CocoBatch(
        images=_stack_images([s.image for s in kept]),
        targets=torch.stack([s.target for s in kept]),
        masks=[s.masks for s in kept] if with_masks else None,
        mask_labels=[s.mask_labels for s in kept] if with_masks else None,
        sizes=torch.tensor([tuple(s.size) for s in kept], dtype=torch.long),
        indices=torch.tensor([int(s.index) for s in kept], dtype=torch.long),
        skipped=skipped,
    )


def segmentation_to_rle(segmentation: Union[list, dict], height: int, width: int) -> dict:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE.

    The same three cases as :meth:`pycocotools.coco.COCO.annToRLE`, with the image size given
    instead of looked up, so that no :class:`~pycocotools.coco.COCO` object has to live in the
    DataLoader workers.
    """
    if isinstance(segmentation, list):  # polygons; an object may have several parts
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE (iscrowd)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        return segmentation  # compressed RLE
    raise ValueError(f"unknown COCO segmentation format: {type(segmentation).__name__}")


class CocoMultiLabel(Dataset):
    r"""MS-COCO images with multi-hot targets and, optionally, per-category union masks.

    The categories of ``ann_file`` sorted by id give the contiguous indices ``0 .. K-1``
    (:attr:`cat_ids`, :attr:`classes`); every annotation, ``iscrowd`` included, marks its
    category present. :attr:`targets` is the ``(M, K)`` bool matrix of all samples (for
    samplers and distractors, no image decoded).

    Policies (nothing silent):

    - ``images_without_annotations`` -- ``"skip"`` (default; the usual multi-label protocol,
      e.g. the 40,137 of the 40,504 val2014 images that the paper's "about 40k" refers to): drop
      them, listed in :attr:`skipped` and counted by :attr:`num_skipped`; ``"keep"``: keep them
      with an all-zero target (negatives for training or for F1); ``"error"``: raise, naming them.
    - ``on_corrupt`` -- an image file that cannot be decoded: ``"error"`` (default) raises
      :class:`~captum_consistency.data.CorruptImageError` naming it; ``"skip"`` returns ``None``
      (with a warning), which :func:`collate_coco_samples` drops and counts in
      ``CocoBatch.skipped``.
    - A file listed in the JSON but absent from ``images_dir`` raises at construction
      (``check_files=True``); an image whose decoded size differs from the JSON's
      ``height``/``width`` raises in ``__getitem__`` (its masks would not line up).

    Args:
        images_dir (str or PathLike): folder of the images (``file_name`` of the JSON).
        ann_file (str or PathLike): the ``instances_*.json`` file.
        transform (callable, optional): applied to the RGB PIL image.
        with_masks (bool): also return the per-category union masks (evaluation).
        images_without_annotations (str): ``"skip"``, ``"keep"`` or ``"error"``.
        on_corrupt (str): ``"error"`` or ``"skip"``.
        check_files (bool): check at construction that every image file exists (one directory
            listing).
        loader (callable, optional): ``path -> PIL image``, :func:`load_rgb` by default.

    Attributes:
        classes (list of str): category names, index order.
        cat_ids (list of int): COCO category id of each index.
        image_ids (list of int): COCO image id of each sample.
        targets (Tensor): ``(M, K)`` bool.
        num_classes (int): ``K``.
        collate_fn (callable): :func:`collate_coco_samples` bound to ``K`` and ``with_masks``.
        skipped (list of (str, str)): images dropped at construction and why.

    Examples::

        >>> val = CocoMultiLabel("/data/coco/val2014", "/data/coco/annotations/instances_val2014.json",
        ...                      transform=eval_transform(224), with_masks=True)
        >>> len(val.classes), val.num_skipped
        (80, 367)
        >>> s = val[0]
        >>> s.target.shape, s.masks.shape, s.mask_labels
        (torch.Size([80]), torch.Size([2, 480, 640]), tensor([ 0, 45]))
    """

    def __init__(
        self,
        images_dir: Union[str, os.PathLike],
        ann_file: Union[str, os.PathLike],
        transform: Optional[Callable] = None,
        with_masks: bool = False,
        images_without_annotations: str = "skip",
        on_corrupt: str = "error",
        check_files: bool = True,
        loader: Optional[Callable[[str], Any]] = None,
    ) -> None:
        if images_without_annotations not in _EMPTY_POLICIES:
            raise ValueError(
                f"images_without_annotations must be one of {_EMPTY_POLICIES}, got {images_without_annotations!r}"
            )
        if on_corrupt not in _CORRUPT_POLICIES:
            raise ValueError(f"on_corrupt must be one of {_CORRUPT_POLICIES}, got {on_corrupt!r}")
        self.images_dir = os.fspath(images_dir)
        self.ann_file = os.fspath(ann_file)
        self.transform = transform
        self.with_masks = bool(with_masks)
        self.images_without_annotations = images_without_annotations
        self.on_corrupt = on_corrupt
        self.loader = loader or load_rgb
        if not os.path.isdir(self.images_dir):
            raise FileNotFoundError(f"COCO images_dir not found: {self.images_dir}")
        if not os.path.isfile(self.ann_file):
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco = COCO(self.ann_file)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed COCO annotation file {self.ann_file}: {e}") from e
        except (KeyError, TypeError, AssertionError) as e:
            raise ValueError(f"COCO annotation file {self.ann_file} lacks a required field: {e!r}") from e

        self.cat_ids = sorted(int(c) for c in coco.getCatIds())
        if not self.cat_ids:
            raise ValueError(f"COCO annotation file {self.ann_file} defines no category")
        self.classes = [str(coco.cats[c].get("name", c)) for c in self.cat_ids]
        cat_to_index = {c: i for i, c in enumerate(self.cat_ids)}
        img_ids = sorted(int(i) for i in coco.getImgIds())
        row_of = {img_id: r for r, img_id in enumerate(img_ids)}
        anns = coco.dataset.get("annotations", [])
        k = len(self.cat_ids)

        # Multi-hot targets in one vectorised scatter over all annotations.
        ann_rows = np.empty(len(anns), dtype=np.int64)
        ann_cats = np.empty(len(anns), dtype=np.int64)
        for j, a in enumerate(anns):
            if a["image_id"] not in row_of or a["category_id"] not in cat_to_index:
                raise ValueError(
                    f"{self.ann_file}: annotation {a.get('id')} refers to an unknown "
                    f"image_id {a['image_id']} or category_id {a['category_id']}"
                )
            ann_rows[j] = row_of[a["image_id"]]
            ann_cats[j] = cat_to_index[a["category_id"]]
        targets = np.zeros((len(img_ids), k), dtype=bool)
        targets[ann_rows, ann_cats] = True

        empty_rows = np.flatnonzero(~targets.any(axis=1))
        file_names = [str(coco.imgs[i]["file_name"]) for i in img_ids]
        self.skipped: List[Tuple[str, str]] = []
        if len(empty_rows) and images_without_annotations == "error":
            names = [file_names[r] for r in empty_rows[:5]]
            raise ValueError(
                f"{len(empty_rows)} image(s) of {self.ann_file} have no annotation: {', '.join(names)}"
                f"{' ...' if len(empty_rows) > 5 else ''}; pass images_without_annotations='skip' "
                "or 'keep'"
            )
        keep = np.ones(len(img_ids), dtype=bool)
        if images_without_annotations == "skip":
            keep[empty_rows] = False
            self.skipped = [(os.path.join(self.images_dir, file_names[r]), "no annotation") for r in empty_rows]
        keep_rows = np.flatnonzero(keep)

        self.image_ids = [img_ids[r] for r in keep_rows]
        self.file_names = [file_names[r] for r in keep_rows]
        self._sizes = np.asarray(
            [(int(coco.imgs[i]["height"]), int(coco.imgs[i]["width"])) for i in self.image_ids], dtype=np.int64
        ).reshape(-1, 2)
        self.targets = torch.from_numpy(targets[keep_rows])
        self.num_classes = k
        #: The DataLoader ``collate_fn`` for this data set (:func:`collate_coco_samples`).
        self.collate_fn = functools.partial(collate_coco_samples, num_classes=k, with_masks=self.with_masks)

        if check_files:
            present = set(os.listdir(self.images_dir))
            missing = [f for f in self.file_names if f not in present and not os.path.isfile(
                os.path.join(self.images_dir, f))]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image file(s) of {self.ann_file} are missing from {self.images_dir}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                )

        if self.with_masks:
            # Per image, the (category index, segmentation) pairs, pickled into one byte buffer.
            blobs = []
            for img_id in self.image_ids:
                items = [
                    (cat_to_index[a["category_id"]], a["id"] if "id" in a else None, a["segmentation"])
                    for a in coco.imgToAnns.get(img_id, [])
                ]
                blobs.append(pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL))
            self._seg_offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
            self._seg_buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        del coco

    @property
    def num_skipped(self) -> int:
        """Number of images dropped at construction."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.image_ids)

    def original_sizes(self) -> List[Tuple[int, int]]:
        """Original ``(H, W)`` of every sample (from the JSON), for SizeGroupedBatchSampler.

        Returns:
            list of (int, int): ``(H, W)`` per sample, in dataset order.
        """
        return [(int(h), int(w)) for h, w in self._sizes]

    def masks(self, index: int) -> Tuple[Tensor, Tensor]:
        """Per present category, the union of its instance masks: ``(P, H, W)`` bool, ``(P,)``.

        One compressed RLE per instance (polygons and RLE alike), merged per category
        with :func:`pycocotools.mask.merge` and decoded once per category.

        Args:
            index (int): the sample's index.

        Returns:
            ``(masks, labels)``: bool ``(P, H, W)`` at the original size, one mask per present
            category, and int64 ``(P,)`` category indices, increasing.

        Raises:
            RuntimeError: the data set was built with ``with_masks=False``.
            ValueError: an unreadable segmentation, or one whose size is not the image's.
        """

        if not self.with_masks:
            raise RuntimeError("CocoMultiLabel was built with with_masks=False; pass with_masks=True")
        h, w = (int(v) for v in self._sizes[index])
        a, b = int(self._seg_offsets[index]), int(self._seg_offsets[index + 1])
        items = pickle.loads(self._seg_buffer[a:b].tobytes())
        per_cat: Dict[int, list] = {}
        for cat, ann_id, segm in items:
            try:
                rle = segmentation_to_rle(segm, h, w)
            except Exception as e:  # pycocotools raises bare Exceptions on bad input
                raise ValueError(
                    f"{self.ann_file}: cannot read the segmentation of annotation {ann_id} "
                    f"(image {self.file_names[index]}): {e}"
                ) from e
            if [int(s) for s in rle["size"]] != [h, w]:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann_id} has an RLE of size {list(rle['size'])} "
                    f"but image {self.file_names[index]} is {h}x{w}"
                )
            per_cat.setdefault(cat, []).append(rle)
        labels = sorted(per_cat)
        if not labels:
            return torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
        merged = [
            per_cat[c][0] if len(per_cat[c]) == 1 else mask_utils.merge(per_cat[c], intersect=False)
            for c in labels
        ]
        decoded = mask_utils.decode(merged)  # (H, W, P) uint8
        masks = torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))).bool()
        return masks, torch.tensor(labels, dtype=torch.long)

    def __getitem__(self, index: int) -> Optional[CocoSample]:
        path = os.path.join(self.images_dir, self.file_names[index])
        img = _load_or_skip(self.loader, path, self.on_corrupt)
        if img is None:
            return None
        size = (int(self._sizes[index, 0]), int(self._sizes[index, 1]))
        if (img.height, img.width) != size:
            raise ValueError(
                f"image {path} is {img.height}x{img.width} (HxW) but {self.ann_file} says "
                f"{size[0]}x{size[1]}; its masks would not line up"
            )
        masks = labels = None
        if self.with_masks:
            masks, labels = self.masks(index)
        if self.transform is not None:
            img = self.transform(img)
        return CocoSample(img, self.targets[index].float(), masks, labels, size, index)
