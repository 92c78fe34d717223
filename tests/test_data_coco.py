"""CocoMultiLabel on a tiny on-disk COCO set with polygon, uncompressed and compressed RLE masks."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from captum_consistency.data import (
    CocoBatch,
    CocoMultiLabel,
    CocoSample,
    CorruptImageError,
    SizeGroupedBatchSampler,
    collate_coco_samples,
    eval_transform,
)
from tests._fixtures_data import corrupt_file, make_coco_folder, uncompressed_rle


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco_folder(tmp_path_factory.mktemp("coco"), num_images=7)


@pytest.fixture
def fresh(tmp_path):
    return make_coco_folder(tmp_path / "coco", num_images=5)


def _shoelace(part):
    x, y = np.asarray(part[0::2]), np.asarray(part[1::2])
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def test_contiguous_categories_and_multi_hot_targets(coco):
    ds = CocoMultiLabel(coco.images_dir, coco.ann_file)
    assert ds.cat_ids == [1, 3, 7] and ds.classes == ["person", "car", "dog"]
    keep = [i for i, img_id in enumerate(coco.image_ids) if img_id not in coco.empty_image_ids]
    assert ds.image_ids == [coco.image_ids[i] for i in keep]
    assert ds.targets.dtype == torch.bool and ds.targets.shape == (len(keep), 3)
    assert torch.equal(ds.targets, torch.from_numpy(coco.targets[keep]))
    for j in range(len(ds)):
        s = ds[j]
        assert isinstance(s, CocoSample)
        assert s.target.dtype == torch.float32 and torch.equal(s.target, ds.targets[j].float())
        assert s.masks is None and s.mask_labels is None
        assert s.size == coco.sizes[keep[j]]


def test_union_masks_match_hand_computed_masks(coco):
    ds = CocoMultiLabel(coco.images_dir, coco.ann_file, with_masks=True)
    pos = {img_id: i for i, img_id in enumerate(coco.image_ids)}
    checked = 0
    for j in range(len(ds)):
        s = ds[j]
        i = pos[ds.image_ids[j]]
        h, w = coco.sizes[i]
        assert s.masks.dtype == torch.bool and s.masks.shape[1:] == (h, w)
        assert s.mask_labels.tolist() == torch.nonzero(s.target).flatten().tolist()
        for m, c in zip(s.masks, s.mask_labels.tolist()):
            if (i, c) in coco.polygons:  # pycocotools' raster of a triangle: area check
                area = sum(_shoelace(p) for p in coco.polygons[(i, c)])
                perimeter = 2 * (h + w)
                assert abs(int(m.sum()) - area) < 0.25 * perimeter
                assert int(m.sum()) > 0
            else:  # rectangles, unions, compressed and uncompressed RLE: exact
                assert torch.equal(m, torch.from_numpy(coco.masks[i][c])), (i, c)
                checked += 1
    assert checked >= 6
    # image 1: union of two overlapping person rectangles, area by inclusion-exclusion
    s = ds[1]
    person = s.masks[s.mask_labels.tolist().index(0)]
    assert int(person.sum()) == 10 * 12 + 12 * 15 - 4 * 4


def test_masks_agree_with_pycocotools_ann_to_mask(coco):
    with contextlib.redirect_stdout(io.StringIO()):
        peer = COCO(coco.ann_file)
    ds = CocoMultiLabel(coco.images_dir, coco.ann_file, with_masks=True)
    for j in range(len(ds)):
        masks, labels = ds.masks(j)
        anns = peer.loadAnns(peer.getAnnIds(imgIds=[ds.image_ids[j]]))
        for m, c in zip(masks, labels.tolist()):
            ref = np.zeros(m.shape, dtype=bool)
            for a in anns:
                if a["category_id"] == ds.cat_ids[c]:
                    ref |= peer.annToMask(a).astype(bool)
            assert torch.equal(m, torch.from_numpy(ref))


def test_uncompressed_rle_helper_is_the_coco_format():
    m = np.zeros((4, 3), dtype=bool)
    m[1:3, 1] = True
    m[3, 2] = True
    # column-major: col0 = 0000, col1 = 0110, col2 = 0001
    assert uncompressed_rle(m)["counts"] == [5, 2, 4, 1]


def test_images_without_annotations_policies(coco):
    empty_file = coco.file_names[coco.image_ids.index(coco.empty_image_ids[0])]
    skip = CocoMultiLabel(coco.images_dir, coco.ann_file)
    assert skip.num_skipped == 1 and os.path.basename(skip.skipped[0][0]) == empty_file
    assert len(skip) == len(coco.image_ids) - 1

    keep = CocoMultiLabel(coco.images_dir, coco.ann_file, with_masks=True, images_without_annotations="keep")
    assert len(keep) == len(coco.image_ids) and keep.num_skipped == 0
    j = keep.image_ids.index(coco.empty_image_ids[0])
    s = keep[j]
    assert not s.target.any() and s.masks.shape == (0, *coco.sizes[j]) and s.mask_labels.numel() == 0

    with pytest.raises(ValueError, match=empty_file):
        CocoMultiLabel(coco.images_dir, coco.ann_file, images_without_annotations="error")
    with pytest.raises(ValueError, match="images_without_annotations"):
        CocoMultiLabel(coco.images_dir, coco.ann_file, images_without_annotations="drop")


def test_corrupt_image_error_and_counted_skip(fresh):
    victim = os.path.join(fresh.images_dir, fresh.file_names[1])
    corrupt_file(victim)
    ds = CocoMultiLabel(fresh.images_dir, fresh.ann_file)
    with pytest.raises(CorruptImageError, match=fresh.file_names[1]):
        ds[1]
    ds = CocoMultiLabel(fresh.images_dir, fresh.ann_file, transform=eval_transform(8), on_corrupt="skip", with_masks=True)
    sampler = SizeGroupedBatchSampler(ds.original_sizes(), 8, short_side=16)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate_fn)
    with pytest.warns(UserWarning, match=fresh.file_names[1]):
        batches = list(loader)
    assert sum(b.skipped for b in batches) == 1
    assert sum(len(b.indices) for b in batches) == len(ds) - 1
    assert any(b.indices.numel() == 0 for b in batches)  # the corrupt image was alone in its group
    for b in batches:
        assert isinstance(b, CocoBatch)
        assert b.targets.shape == (len(b.indices), 3)
        assert len(b.masks) == len(b.mask_labels) == len(b.indices)
        for m, (h, w) in zip(b.masks, b.sizes.tolist()):
            assert m.shape[1:] == (h, w)  # masks stay at the original size


def test_missing_image_file_is_named_at_construction(fresh):
    os.remove(os.path.join(fresh.images_dir, fresh.file_names[2]))
    with pytest.raises(FileNotFoundError, match=fresh.file_names[2]):
        CocoMultiLabel(fresh.images_dir, fresh.ann_file)


def test_size_disagreeing_with_json_raises(fresh):
    path = os.path.join(fresh.images_dir, fresh.file_names[0])
    Image.open(path).convert("RGB").resize((10, 10)).save(path, format="JPEG")
    ds = CocoMultiLabel(fresh.images_dir, fresh.ann_file, with_masks=True)
    with pytest.raises(ValueError, match=fresh.file_names[0]):
        ds[0]


def test_bad_annotation_files_are_named(fresh, tmp_path):
    data = json.loads(Path(fresh.ann_file).read_text())
    data["annotations"][0]["category_id"] = 99
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="category_id 99"):
        CocoMultiLabel(fresh.images_dir, bad)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        CocoMultiLabel(fresh.images_dir, broken)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        CocoMultiLabel(fresh.images_dir, tmp_path / "nothere.json")


def test_collate_keeps_masks_as_lists_and_transform_is_applied(coco):
    ds = CocoMultiLabel(coco.images_dir, coco.ann_file, transform=eval_transform(10), with_masks=True)
    same = [j for j in range(len(ds)) if ds.original_sizes()[j] == ds.original_sizes()[0]]
    batch = collate_coco_samples([ds[j] for j in same])
    assert batch.images.shape == (len(same), 3, 20, 28)  # (40, 56) -> short side 20
    assert batch.targets.shape == (len(same), 3)
    assert [m.shape[0] for m in batch.masks] == [int(t.sum()) for t in batch.targets]
    no_masks = CocoMultiLabel(coco.images_dir, coco.ann_file, transform=eval_transform(10))
    b = collate_coco_samples([no_masks[same[0]], no_masks[same[1]]])
    assert b.masks is None and b.mask_labels is None
    with pytest.raises(RuntimeError, match="with_masks"):
        no_masks.masks(0)
