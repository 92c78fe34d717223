"""Tiny data sets on disk in the real formats, for the data tests and the end-to-end recipe tests.

Usage::

    from tests._fixtures_data import make_imagenet_folder, make_coco_folder

    inet = make_imagenet_folder(tmp_path / "imagenet")     # train/ + val/ + boxes/val/*.xml
    ds = ImageNetWithBoxes(inet.root, "val", boxes_dir=inet.boxes_dirs["val"])
    coco = make_coco_folder(tmp_path / "coco")             # val2017/*.jpg + annotations/*.json
    ds = CocoMultiLabel(coco.images_dir, coco.ann_file, with_masks=True)

Everything is deterministic given ``seed``; the returned records hold the ground truth that the
files encode (boxes, sizes, multi-hot targets, union masks) for hand-checked assertions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

__all__ = [
    "ImageNetFixture",
    "CocoFixture",
    "make_imagenet_folder",
    "make_coco_folder",
    "write_voc_xml",
    "corrupt_file",
    "uncompressed_rle",
]

PathLike = Union[str, os.PathLike]
Box = Tuple[int, int, int, int, bool]  # x1, y1, x2, y2, difficult


class ImageNetFixture(NamedTuple):
    """What :func:`make_imagenet_folder` wrote.

    Attributes:
        root (str): the data root, holding ``train/`` and/or ``val/`` (``--data-root``).
        classes (list of str): the wnids, sorted (= class indices).
        boxes_dirs (dict): split -> folder of the XML files (``--boxes``), for the splits with
            boxes.
        files (dict): split -> list of image paths, in ImageFolder order.
        labels (dict): split -> list of class indices, aligned with ``files``.
        boxes (dict): image stem -> list of ``(x1, y1, x2, y2, difficult)`` of *its* class (the
            XML may also hold a box of another class, not listed here).
        sizes (dict): image stem -> original ``(H, W)``.
    """

    root: str
    classes: List[str]
    boxes_dirs: Dict[str, str]
    files: Dict[str, List[str]]
    labels: Dict[str, List[int]]
    boxes: Dict[str, List[Box]]
    sizes: Dict[str, Tuple[int, int]]


class CocoFixture(NamedTuple):
    """What :func:`make_coco_folder` wrote.

    Attributes:
        root (str): the folder holding ``images_dir`` and ``annotations/``.
        images_dir (str): folder of the JPEG files (``--data-root``).
        ann_file (str): the ``instances_<split>.json`` (``--ann-file``).
        cat_ids (list of int): category ids, sorted (non-contiguous: 1, 3, 7, ...).
        classes (list of str): category names in that order.
        image_ids (list of int): all image ids, sorted, including the unannotated ones.
        file_names (list of str): aligned with ``image_ids``.
        sizes (list of (H, W)): aligned with ``image_ids``.
        targets (np.ndarray): ``(M, K)`` bool multi-hot of every image (all False for the
            unannotated ones).
        masks (list of dict): per image, category index -> ``(H, W)`` bool union mask, computed
            by hand (numpy), not with pycocotools; categories drawn as non-rectangular polygons
            are absent here and listed in ``polygons`` instead.
        polygons (dict): ``(image position, category index)`` -> the polygon parts (flat
            ``[x0, y0, x1, y1, ...]`` lists) of the categories whose raster is left to
            pycocotools (compare areas with the shoelace formula).
        empty_image_ids (list of int): images without any annotation.
    """

    root: str
    images_dir: str
    ann_file: str
    cat_ids: List[int]
    classes: List[str]
    image_ids: List[int]
    file_names: List[str]
    sizes: List[Tuple[int, int]]
    targets: np.ndarray
    masks: List[Dict[int, np.ndarray]]
    polygons: Dict[Tuple[int, int], List[List[float]]]
    empty_image_ids: List[int]


def _wnid(c: int) -> str:
    return f"n{c + 1:08d}"


def _palette(k: int) -> np.ndarray:
    hues = np.linspace(0, 1, k, endpoint=False)
    return np.stack(
        [np.abs(np.sin(np.pi * (hues + s))) * 200 + 40 for s in (0.0, 1 / 3, 2 / 3)], axis=1
    ).astype(np.uint8)


def _write_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=92)


def write_voc_xml(
    path: PathLike,
    filename: str,
    size: Tuple[int, int],
    objects: Sequence[Tuple[str, Tuple[float, float, float, float], bool]],
    folder: str = "val",
) -> None:
    """Writes an ILSVRC / PASCAL VOC bounding-box XML: ``objects`` are ``(name, box, difficult)``."""
    h, w = size
    parts = [
        "<annotation>",
        f"\t<folder>{folder}</folder>",
        f"\t<filename>{filename}</filename>",
        "\t<source>\n\t\t<database>ILSVRC_2012</database>\n\t</source>",
        f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for name, (x1, y1, x2, y2), difficult in objects:
        parts.append(
            "\t<object>\n"
            f"\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
            f"\t\t<difficult>{int(bool(difficult))}</difficult>\n"
            f"\t\t<bndbox>\n\t\t\t<xmin>{x1:g}</xmin>\n\t\t\t<ymin>{y1:g}</ymin>\n"
            f"\t\t\t<xmax>{x2:g}</xmax>\n\t\t\t<ymax>{y2:g}</ymax>\n\t\t</bndbox>\n"
            "\t</object>"
        )
    parts.append("</annotation>\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(parts))


def make_imagenet_folder(
    root: PathLike,
    num_classes: int = 3,
    images_per_class: int = 4,
    splits: Sequence[str] = ("train", "val"),
    boxes_splits: Sequence[str] = ("val",),
    image_sizes: Sequence[Tuple[int, int]] = ((48, 64), (64, 48)),
    seed: int = 0,
) -> ImageNetFixture:
    """Writes an ImageNet-like tree: ``<root>/<split>/<wnid>/<stem>.JPEG`` and VOC XML boxes.

    Each image is low-amplitude noise with one or two filled boxes in its class colour (so a
    model can learn the classes, and the boxes are where the object is). Sizes cycle through
    ``image_sizes`` (landscape and portrait by default). Boxes of split ``s`` in
    ``boxes_splits`` go to ``<root>/boxes/<s>/``: flat for ``val`` (as ILSVRC2012's validation
    boxes), in ``<wnid>/`` sub-folders otherwise (as the training boxes unpack). In every split
    with boxes, the first image of each class has a second, ``difficult`` box, and the second
    image's XML also holds a box of another class (which the data set must ignore).

    Args:
        root (str or PathLike): created if needed.
        num_classes (int): number of class folders (wnids ``n00000001``, ...).
        images_per_class (int): images per class and split.
        splits (sequence of str): split folders to write.
        boxes_splits (sequence of str): splits that get XML files.
        image_sizes (sequence of (H, W)): original sizes, cycled over the images.
        seed (int): seed of the boxes and the noise.

    Returns:
        :class:`ImageNetFixture`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = _palette(num_classes)
    classes = [_wnid(c) for c in range(num_classes)]
    files: Dict[str, List[str]] = {}
    labels: Dict[str, List[int]] = {}
    boxes: Dict[str, List[Box]] = {}
    sizes: Dict[str, Tuple[int, int]] = {}
    boxes_dirs: Dict[str, str] = {}
    counter = 0
    for split in splits:
        files[split], labels[split] = [], []
        with_boxes = split in boxes_splits
        if with_boxes:
            boxes_dirs[split] = str(root / "boxes" / split)
        for c, wnid in enumerate(classes):
            for i in range(images_per_class):
                counter += 1
                h, w = image_sizes[counter % len(image_sizes)]
                stem = f"ILSVRC2012_val_{counter:08d}" if split == "val" else f"{wnid}_{counter}"
                pixels = rng.integers(90, 130, size=(h, w, 3), dtype=np.uint8)
                bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
                x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                own: List[Box] = [(x1, y1, x1 + bw - 1, y1 + bh - 1, False)]
                if i == 0:  # a second, difficult box of the same class
                    own.append((0, 0, w // 5, h // 5, True))
                for bx1, by1, bx2, by2, _ in own:
                    pixels[by1 : by2 + 1, bx1 : bx2 + 1] = colours[c]
                path = root / split / wnid / f"{stem}.JPEG"
                _write_jpeg(path, pixels)
                files[split].append(str(path))
                labels[split].append(c)
                sizes[stem] = (h, w)
                if with_boxes:
                    boxes[stem] = own
                    objects = [(wnid, b[:4], b[4]) for b in own]
                    if i == 1:  # an object of another class in the same XML
                        objects.append((_wnid((c + 1) % num_classes), (1, 2, 5, 6), False))
                    xml_dir = Path(boxes_dirs[split]) if split == "val" else Path(boxes_dirs[split]) / wnid
                    write_voc_xml(xml_dir / f"{stem}.xml", stem, (h, w), objects, folder=split)
    return ImageNetFixture(str(root), classes, boxes_dirs, files, labels, boxes, sizes)


def uncompressed_rle(mask: np.ndarray) -> Dict[str, list]:
    """COCO uncompressed RLE of a binary mask, by hand: column-major runs, starting with zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts: List[int] = []
    value, run = 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = int(v), 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _compressed_rle(mask: np.ndarray) -> Dict[str, object]:
    from pycocotools import mask as mask_utils  # only to *write* the compressed string

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_coco_folder(
    root: PathLike,
    split: str = "val2017",
    num_images: int = 6,
    image_sizes: Sequence[Tuple[int, int]] = ((40, 56), (56, 40)),
    seed: int = 0,
) -> CocoFixture:
    """Writes a COCO-like data set: ``<root>/<split>/*.jpg`` and ``annotations/instances_<split>.json``.

    Three categories with non-contiguous ids (1 person, 3 car, 7 dog). The first images exercise
    every segmentation format (``num_images >= 4`` required):

    - image 0: a rectangle polygon (person) and a compressed-RLE ellipse (car);
    - image 1: two overlapping rectangle polygons of one person category (their union is the
      mask), and an ``iscrowd`` uncompressed RLE (dog);
    - image 2: a compressed RLE (dog) and a triangle polygon of two parts (car);
    - image 3: no annotation at all;
    - images 4..: one rectangle polygon of category ``i % 3``.

    Each image shows its objects in category colours on noise. The hand-computed union masks use
    the rasterisation of :mod:`pycocotools` for axis-aligned rectangles with integer corners
    ``(x1, y1)-(x2, y2)``: rows ``y1..y2-1``, columns ``x1..x2-1``; the triangle is recorded
    by its vertices (its exact raster is pycocotools' business, tests compare areas).

    Args:
        root (str or PathLike): created if needed.
        split (str): images folder name and JSON suffix (call twice for train and val).
        num_images (int): at least 4.
        image_sizes (sequence of (H, W)): cycled over the images.
        seed (int): seed of the pixel noise.

    Returns:
        :class:`CocoFixture`; ``masks[3]`` is empty and image 3 is in ``empty_image_ids``;
        the car triangles of image 2 are in ``polygons[(2, 1)]``, not in ``masks[2]``.
    """
    if num_images < 4:
        raise ValueError("num_images must be >= 4")
    root = Path(root)
    rng = np.random.default_rng(seed)
    images_dir = root / split
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    cat_ids = [1, 3, 7]
    classes = ["person", "car", "dog"]
    colours = _palette(3)
    images, annotations = [], []
    masks: List[Dict[int, np.ndarray]] = []
    polygons: Dict[Tuple[int, int], List[List[float]]] = {}
    targets = np.zeros((num_images, 3), dtype=bool)
    sizes: List[Tuple[int, int]] = []
    ann_id = 1

    def add(image_id: int, cat_index: int, segmentation, iscrowd: int = 0) -> None:
        nonlocal ann_id
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat_ids[cat_index],
                "segmentation": segmentation,
                "iscrowd": iscrowd,
                "area": 0.0,
                "bbox": [0, 0, 1, 1],
            }
        )
        ann_id += 1

    def rect(x1: int, y1: int, x2: int, y2: int, h: int, w: int) -> Tuple[list, np.ndarray]:
        m = np.zeros((h, w), dtype=bool)
        m[y1:y2, x1:x2] = True
        return [[x1, y1, x2, y1, x2, y2, x1, y2]], m

    image_ids = [1000 + i for i in range(num_images)]
    file_names = [f"{image_id:012d}.jpg" for image_id in image_ids]
    for i, (image_id, fname) in enumerate(zip(image_ids, file_names)):
        h, w = image_sizes[i % len(image_sizes)]
        sizes.append((h, w))
        per_cat: Dict[int, np.ndarray] = {}

        def union(c: int, m: np.ndarray) -> None:
            per_cat[c] = per_cat.get(c, np.zeros((h, w), dtype=bool)) | m

        if i == 0:
            seg, m = rect(3, 4, 15, 20, h, w)
            add(image_id, 0, seg)
            union(0, m)
            m = _ellipse(h, w, h * 0.6, w * 0.6, h * 0.2, w * 0.15)
            add(image_id, 1, _compressed_rle(m))
            union(1, m)
        elif i == 1:
            seg, m = rect(2, 2, 12, 14, h, w)
            add(image_id, 0, seg)
            union(0, m)
            seg, m = rect(8, 10, 20, 25, h, w)
            add(image_id, 0, seg)
            union(0, m)
            m = _ellipse(h, w, h * 0.75, w * 0.5, h * 0.15, w * 0.3)
            add(image_id, 2, uncompressed_rle(m), iscrowd=1)
            union(2, m)
        elif i == 2:
            m = _ellipse(h, w, h * 0.3, w * 0.3, h * 0.2, w * 0.2)
            add(image_id, 2, _compressed_rle(m))
            union(2, m)
            tri = [
                [w * 0.5, h * 0.5, w * 0.95, h * 0.5, w * 0.95, h * 0.95],
                [1.0, h - 6.0, 5.0, h - 6.0, 1.0, h - 2.0],
            ]
            tri = [[float(v) for v in part] for part in tri]
            add(image_id, 1, tri)
            polygons[(i, 1)] = tri
            targets[i, 1] = True
        elif i >= 4:
            c = i % 3
            seg, m = rect(w // 4, h // 4, w // 4 + 10, h // 4 + 12, h, w)
            add(image_id, c, seg)
            union(c, m)
        for c in per_cat:
            targets[i, c] = True
        pixels = rng.integers(90, 130, size=(h, w, 3), dtype=np.uint8)
        for c, m in per_cat.items():
            pixels[m] = colours[c]
        _write_jpeg(images_dir / fname, pixels)
        images.append({"id": image_id, "file_name": fname, "height": h, "width": w})
        masks.append(per_cat)

    dataset = {
        "info": {"description": "captum-consistency test fixture"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, "supercategory": "thing"} for cid, name in zip(cat_ids, classes)
        ],
    }
    ann_file = ann_dir / f"instances_{split}.json"
    ann_file.write_text(json.dumps(dataset))
    return CocoFixture(
        root=str(root),
        images_dir=str(images_dir),
        ann_file=str(ann_file),
        cat_ids=cat_ids,
        classes=classes,
        image_ids=image_ids,
        file_names=file_names,
        sizes=sizes,
        targets=targets,
        masks=masks,
        polygons=polygons,
        empty_image_ids=[image_ids[3]],
    )


def corrupt_file(path: PathLike, keep_bytes: Optional[int] = 200) -> None:
    """Corrupts an image in place: truncates it to ``keep_bytes`` (``None``: garbage bytes)."""
    path = Path(path)
    if keep_bytes is None:
        path.write_bytes(b"this is not an image" * 10)
    else:
        path.write_bytes(path.read_bytes()[:keep_bytes])
