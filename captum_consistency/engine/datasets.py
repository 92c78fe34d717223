"""From command-line options to the library's data sets: what the three recipes share.

Layouts read by the recipes (``--data``):

* ``imagenet`` -- any ImageFolder tree: ``<data-root>/<split>/<class>/<image>`` with splits
  ``train`` and ``val`` (``--train-split``, ``--val-split``), and the ILSVRC2012 bounding-box
  XMLs of the evaluated split in ``--boxes DIR``
  (:class:`~captum_consistency.data.ImageNetWithBoxes`).
* ``coco`` -- ``<data-root>/<split>/*.jpg`` with ``<data-root>/annotations/instances_<split>.json``
  (splits ``train2014`` and ``val2014`` by default, those of the paper); ``--ann-file``
  overrides the annotation file (:class:`~captum_consistency.data.CocoMultiLabel`).
* ``synthetic`` -- :class:`~captum_consistency.data.SpuriousContextShapes`, generated on the fly
  (no files); its options are recorded in the checkpoint so that evaluation regenerates the
  same data.

Fixed-size evaluation images (classification accuracy, FGSM, and the NQH composites) follow
the usual protocol of each data set: ImageNet ``Resize(S * 256 / 224)`` + ``CenterCrop(S)``
(torchvision's references), COCO ``Resize((S, S))`` (the authors' COCO validation), synthetic
images as generated (``S x S``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from captum_consistency.attr._families import display_name
from captum_consistency.builders import ARCHITECTURES, build_model, is_timm_arch
from captum_consistency.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoMultiLabel,
    ImageNetWithBoxes,
    SpuriousContextShapes,
    eval_transform,
    train_transform,
)
from captum_consistency.engine.checkpoint import load_checkpoint, load_model_weights
from captum_consistency.engine.training import default_schedule

__all__ = [
    "DATA_KINDS",
    "DEFAULT_SPLITS",
    "ARCH_NAMES",
    "model_name",
    "load_model_from_checkpoint",
    "resolve_data_args",
    "DataInfo",
    "crop_transform",
    "coco_paths",
    "build_dataset",
    "dataset_normalization",
]

DATA_KINDS = ("imagenet", "coco", "synthetic")
DEFAULT_SPLITS = {
    "imagenet": ("train", "val"),
    "coco": ("train2014", "val2014"),
    "synthetic": ("train", "val"),
}


@dataclass
class DataInfo:
    """A data set and what the recipes need to know about it.

    Attributes:
        dataset: the torch data set.
        classes: class names, index order (from the data, never a fixed list).
        multilabel: multi-hot targets (COCO).
        collate_fn: the data set's collate function (``None``: the default one).
        targets: all targets without decoding (class ids or ``(M, K)`` multi-hot).
        mean, std: the normalisation the images went through.
    """

    dataset: Dataset
    classes: List[str]
    multilabel: bool
    collate_fn: Optional[Callable]
    targets: Any
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def crop_transform(image_size: int, data: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """Fixed-size ``S x S`` evaluation transform (see the module docstring)."""
    if data == "coco":
        resize: List[Any] = [v2.Resize((image_size, image_size), antialias=True)]
    else:
        resize = [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [v2.ToImage(), *resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    )


def coco_paths(data_root: str, split: str, ann_file: Optional[str] = None) -> Tuple[str, str]:
    """``(<data-root>/<split>, ann_file or <data-root>/annotations/instances_<split>.json)``."""
    images_dir = os.path.join(data_root, split)
    if ann_file is None:
        ann_file = os.path.join(data_root, "annotations", f"instances_{split}.json")
    return images_dir, ann_file


def dataset_normalization(data: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of the images of ``data`` (ImageNet's or the generator's)."""
    if data == "synthetic":
        return SpuriousContextShapes.mean, SpuriousContextShapes.std
    return IMAGENET_MEAN, IMAGENET_STD


def build_dataset(
    data: str,
    split: str,
    mode: str,
    image_size: int,
    data_root: Optional[str] = None,
    boxes: Optional[str] = None,
    ann_file: Optional[str] = None,
    classes: Optional[Sequence[str]] = None,
    skip_corrupt: bool = False,
    skip_missing_boxes: bool = False,
    synthetic: Optional[dict] = None,
    allow_empty: bool = False,
    masks: bool = False,
) -> DataInfo:
    """Builds one split for one use.

    Args:
        data (str): ``"imagenet"``, ``"coco"`` or ``"synthetic"``.
        split (str): split folder (ImageNet, COCO) or generator split (synthetic).
        mode (str): ``"train"`` (random crops, flips), ``"crop"`` (fixed ``S x S``) or
            ``"whole"`` (the paper's interpretation protocol: whole image, short side ``2S``,
            with boxes or masks at the original size).
        image_size (int): ``S``.
        data_root (str, optional): root folder (ImageNet, COCO).
        boxes (str, optional): XML folder (ImageNet ``"whole"``; required there).
        ann_file (str, optional): COCO annotation file override.
        classes (sequence of str, optional): the class list of the model (ImageNet), so that a
            split with a missing class folder keeps the indices.
        skip_corrupt (bool): skip (and count) undecodable images instead of raising.
        skip_missing_boxes (bool): skip (and count) validation images without a usable XML
            instead of raising (ImageNet ``"whole"``).
        synthetic (dict, optional): keyword arguments of
            :class:`~captum_consistency.data.SpuriousContextShapes` (``num_classes``, ``length``,
            ``seed``, ``cue_strength``, ...).
        allow_empty (bool): keep ImageNet class folders without images
            (``--allow-empty-classes``); always the case when ``classes`` is given.
        masks (bool): with ``mode="train"``, samples carry their object mask in the training
            crop (:class:`~captum_consistency.data.WithTrainingMasks`, for the mask-guided
            losses): the shapes' exact masks, COCO's segmentation of a drawn present category,
            ImageNet's boxes of the training split (``boxes`` required; images without a box
            get an empty mask, which the losses skip and count).

    Returns:
        DataInfo
    """
    if data not in DATA_KINDS:
        raise ValueError(f"data must be one of {DATA_KINDS}, got {data!r}")
    if mode not in ("train", "crop", "whole"):
        raise ValueError(f"mode must be 'train', 'crop' or 'whole', got {mode!r}")
    mean, std = dataset_normalization(data)
    on_corrupt = "skip" if skip_corrupt else "error"
    if masks:
        return _masked_training_set(data, split, mode, image_size, data_root, boxes, ann_file,
                                    on_corrupt, synthetic, allow_empty, mean, std)
    if data == "synthetic":
        kwargs = dict(synthetic or {})
        kwargs.setdefault("image_size", image_size)
        ds = SpuriousContextShapes(split, annotations=(mode == "whole"), **kwargs)
        return DataInfo(ds, list(ds.classes), False, None, list(ds.targets), mean, std)
    if data_root is None:
        raise ValueError(f"--data-root is required with --data {data}")
    if mode == "train":
        transform = train_transform(image_size)
    elif mode == "crop":
        transform = crop_transform(image_size, data)
    else:
        transform = eval_transform(image_size)
    if data == "imagenet":
        if mode == "whole" and boxes is None:
            raise ValueError(
                "--boxes DIR (the ILSVRC bounding-box XMLs of the evaluated split) is required to "
                "compute the interpretation metrics on ImageNet"
            )
        ds = ImageNetWithBoxes(
            data_root,
            split,
            boxes_dir=boxes if mode == "whole" else None,
            transform=transform,
            classes=classes,
            on_missing_boxes="skip" if skip_missing_boxes else "error",
            on_corrupt=on_corrupt,
            allow_empty=allow_empty or classes is not None,
        )
        return DataInfo(ds, list(ds.classes), False, ds.collate_fn, list(ds.targets), mean, std)
    images_dir, ann = coco_paths(data_root, split, ann_file)
    ds = CocoMultiLabel(
        images_dir,
        ann,
        transform=transform,
        with_masks=(mode == "whole"),
        images_without_annotations="skip",
        on_corrupt=on_corrupt,
    )
    if classes is not None and list(classes) != list(ds.classes):
        raise ValueError(
            f"the categories of {ann} ({len(ds.classes)}) differ from the model's classes "
            f"({len(classes)}); evaluate with the annotation file the model was trained with"
        )
    return DataInfo(ds, list(ds.classes), True, ds.collate_fn, ds.targets, mean, std)


def _masked_training_set(data, split, mode, image_size, data_root, boxes, ann_file, on_corrupt,
                         synthetic, allow_empty, mean, std) -> DataInfo:
    from captum_consistency.data.guided import WithTrainingMasks, collate_masked_samples

    if mode != "train":
        raise ValueError(f"masks=True is for mode='train' (the training crops), got mode={mode!r}")
    if data == "synthetic":
        kwargs = dict(synthetic or {})
        kwargs.setdefault("image_size", image_size)
        ds = SpuriousContextShapes(split, annotations=True, **kwargs)
        return DataInfo(WithTrainingMasks(ds, image_size, mean, std), list(ds.classes), False,
                        collate_masked_samples, list(ds.targets), mean, std)
    if data_root is None:
        raise ValueError(f"--data-root is required with --data {data}")
    if data == "imagenet":
        if boxes is None:
            raise ValueError(
                "a mask-guided loss on ImageNet needs the training split's bounding-box XMLs: "
                "pass --boxes DIR (images without a box are skipped by the loss and counted)"
            )
        ds = ImageNetWithBoxes(data_root, split, boxes_dir=boxes, transform=None,
                               on_missing_boxes="empty", on_corrupt=on_corrupt, allow_empty=allow_empty)
        return DataInfo(WithTrainingMasks(ds, image_size, mean, std), list(ds.classes), False,
                        collate_masked_samples, list(ds.targets), mean, std)
    images_dir, ann = coco_paths(data_root, split, ann_file)
    ds = CocoMultiLabel(images_dir, ann, transform=None, with_masks=True,
                        images_without_annotations="skip", on_corrupt=on_corrupt)
    return DataInfo(WithTrainingMasks(ds, image_size, mean, std), list(ds.classes), True,
                    collate_masked_samples, ds.targets, mean, std)


#: Report names of the architectures :func:`~captum_consistency.builders.build_model` builds
#: (``"resnet18"`` -> ``"ResNet18"``, ``"convnext_tiny"`` -> ``"ConvNeXt-tiny"``).
ARCH_NAMES: Dict[str, str] = {arch: display_name(arch) for arch in ARCHITECTURES}


def model_name(ckpt: dict) -> str:
    """``ResNet18 GMP + GC``-style name from a checkpoint (lambda 0: ``Baseline``; a checkpoint
    without a recorded lambda had the default of its data, :func:`default_schedule`; another
    ``--loss`` than ``gc`` is named in capitals: ``ResNet18 + CGC``)."""
    lam = (ckpt.get("args") or {}).get("gc_lambda")
    if lam is None:
        data = ckpt.get("data") if ckpt.get("data") in DATA_KINDS else "imagenet"
        lam = default_schedule(data, ckpt.get("arch")).gc_lambda
    parts = []
    if ckpt.get("gmp"):
        parts.append("GMP")
    loss = (ckpt.get("args") or {}).get("loss") or "gc"
    if lam and lam > 0:
        parts.append(loss.upper())
    return f"{ARCH_NAMES.get(ckpt.get('arch'), ckpt.get('arch'))} {' + '.join(parts) or 'Baseline'}"


def load_model_from_checkpoint(path: str, device: torch.device):
    """Builds the checkpoint's model and loads its weights; returns ``(model, checkpoint)``."""
    ckpt = load_checkpoint(path, map_location="cpu")
    for key in ("arch", "num_classes"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} lacks {key!r}; was it written by recipes/train.py?")
    if ckpt["arch"] not in ARCHITECTURES and not is_timm_arch(ckpt["arch"]):
        raise ValueError(
            f"checkpoint {path} records the architecture {ckpt['arch']!r}, which this version "
            f"cannot build (known: {', '.join(ARCHITECTURES)})"
        )
    model = build_model(ckpt["arch"], int(ckpt["num_classes"]), gmp=bool(ckpt.get("gmp", False)))
    load_model_weights(model, ckpt["model"], path, arch=ckpt["arch"])
    return model.to(device).eval(), ckpt


def resolve_data_args(args, ckpt: dict):
    """``(data, data_root, image_size, split, synthetic kwargs)``: options left unset in
    ``args`` (``data``, ``data_root``, ``image_size``, ``split``, ``checkpoint``) are taken from
    the checkpoint's recorded arguments, as are the ``synthetic_*`` options left at ``None``;
    the evaluated split defaults to ``val`` (ImageNet), ``val2014`` (COCO) or ``test``
    (synthetic, whose cue is independent of the class)."""
    saved = ckpt.get("args") or {}
    data = args.data or ckpt.get("data") or saved.get("data")
    if data is None:
        raise ValueError("--data is required (the checkpoint does not record it)")
    if ckpt.get("data") not in (None, data):
        raise ValueError(f"checkpoint {args.checkpoint} was trained on {ckpt['data']}, not {data}")
    data_root = args.data_root or (saved.get("data_root") if data != "synthetic" else None)
    image_size = args.image_size or ckpt.get("image_size") or saved.get("image_size") or 224
    split = args.split or ("test" if data == "synthetic" else DEFAULT_SPLITS[data][1])
    synthetic = None
    if data == "synthetic":
        def given(name, default):  # the command line's value, else the checkpoint's
            value = getattr(args, name, None)
            return value if value is not None else saved.get(name, default)

        synthetic = {
            "num_classes": given("synthetic_classes", ckpt.get("num_classes")),
            "length": given("synthetic_val_length", 1000),
            "seed": given("synthetic_seed", 0),
            "cue_strength": given("synthetic_cue_strength", 0.9),
        }
    return data, data_root, int(image_size), split, synthetic
