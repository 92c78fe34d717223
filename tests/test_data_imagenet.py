"""ImageNetWithBoxes, the transforms and SizeGroupedBatchSampler, on tiny on-disk data sets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from captum_consistency import SkippedImageWarning
from captum_consistency.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    ImageBatch,
    ImageNetWithBoxes,
    ImageSample,
    SizeGroupedBatchSampler,
    boxes_to_mask,
    collate_image_samples,
    eval_transform,
    parse_voc_xml,
    resized_size,
    train_transform,
)
from tests._fixtures_data import corrupt_file, make_imagenet_folder, write_voc_xml


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), num_classes=3, images_per_class=4)


@pytest.fixture
def fresh(tmp_path):
    """A private copy to damage."""
    return make_imagenet_folder(tmp_path / "inet", num_classes=3, images_per_class=3, splits=("val",))


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def test_val_samples_carry_their_class_boxes_in_original_pixels(inet):
    ds = ImageNetWithBoxes(inet.root, "val", boxes_dir=inet.boxes_dirs["val"])
    assert ds.classes == inet.classes
    assert ds.targets == inet.labels["val"]
    assert len(ds) == len(inet.files["val"]) == 12
    assert ds.num_skipped == 0
    for i, path in enumerate(inet.files["val"]):
        s = ds[i]
        assert isinstance(s, ImageSample)
        stem = _stem(path)
        expected = inet.boxes[stem]  # boxes of the image's own class only
        assert s.target == inet.labels["val"][i]
        assert s.size == inet.sizes[stem]
        assert s.index == i
        assert s.boxes.dtype == torch.float32 and s.boxes.shape == (len(expected), 4)
        assert s.boxes.tolist() == [list(map(float, b[:4])) for b in expected]
        assert s.difficult.tolist() == [b[4] for b in expected]
        assert isinstance(s.image, Image.Image) and (s.image.height, s.image.width) == s.size


def test_other_class_objects_in_the_xml_are_ignored(inet):
    ds = ImageNetWithBoxes(inet.root, "val", boxes_dir=inet.boxes_dirs["val"])
    path = inet.files["val"][1]  # the fixture's XML of this image also has a box of the next class
    objects, size = parse_voc_xml(os.path.join(inet.boxes_dirs["val"], _stem(path) + ".xml"))
    assert len(objects) == 2 and objects[1].name != inet.classes[inet.labels["val"][1]]
    assert size == inet.sizes[_stem(path)]
    assert ds[1].boxes.shape == (1, 4)
    assert ds[1].boxes[0].tolist() == list(map(float, objects[0].box))


def test_train_boxes_in_wnid_subfolders(tmp_path):
    fx = make_imagenet_folder(tmp_path, num_classes=2, images_per_class=2, splits=("train",), boxes_splits=("train",))
    assert any(p.is_dir() for p in Path(fx.boxes_dirs["train"]).iterdir())  # nested layout
    ds = ImageNetWithBoxes(fx.root, "train", boxes_dir=fx.boxes_dirs["train"])
    for i, path in enumerate(fx.files["train"]):
        assert ds[i].boxes.tolist() == [list(map(float, b[:4])) for b in fx.boxes[_stem(path)]]


def test_without_boxes_dir_samples_have_no_boxes(inet):
    ds = ImageNetWithBoxes(inet.root, "train", transform=train_transform(16))
    s = ds[0]
    assert s.boxes.shape == (0, 4) and s.difficult.shape == (0,)
    assert s.image.shape == (3, 16, 16)
    assert ds.targets == inet.labels["train"]


def test_missing_xml_error_names_the_file(fresh):
    victim = _stem(fresh.files["val"][4])
    os.remove(os.path.join(fresh.boxes_dirs["val"], victim + ".xml"))
    with pytest.raises(FileNotFoundError, match=f"{victim}.xml") as info:
        ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"])
    assert "1 image(s)" in str(info.value)


def test_missing_xml_skip_is_counted_and_keeps_alignment(fresh):
    victim = fresh.files["val"][4]
    os.remove(os.path.join(fresh.boxes_dirs["val"], _stem(victim) + ".xml"))
    ds = ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"], on_missing_boxes="skip")
    assert len(ds) == len(fresh.files["val"]) - 1
    assert ds.num_skipped == 1 and ds.skipped[0][0] == victim and "no bounding-box XML" in ds.skipped[0][1]
    kept = [p for p in fresh.files["val"] if p != victim]
    assert [p for p, _ in ds.samples] == kept
    assert ds.targets == [fresh.labels["val"][fresh.files["val"].index(p)] for p in kept]
    for i, p in enumerate(kept):  # boxes still belong to the right image after the skip
        assert ds[i].boxes.tolist() == [list(map(float, b[:4])) for b in fresh.boxes[_stem(p)]]


def test_missing_xml_empty_policy_keeps_the_image_without_boxes(fresh):
    os.remove(os.path.join(fresh.boxes_dirs["val"], _stem(fresh.files["val"][2]) + ".xml"))
    ds = ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"], on_missing_boxes="empty")
    assert len(ds) == len(fresh.files["val"])
    assert ds[2].boxes.shape == (0, 4)
    assert ds[3].boxes.shape[0] >= 1


def test_xml_without_a_box_of_the_class_counts_as_missing(fresh):
    path = fresh.files["val"][0]
    stem = _stem(path)
    other = fresh.classes[(fresh.labels["val"][0] + 1) % 3]
    write_voc_xml(os.path.join(fresh.boxes_dirs["val"], stem + ".xml"), stem, fresh.sizes[stem], [(other, (1, 1, 4, 4), False)])
    with pytest.raises(FileNotFoundError, match=f"has no box of class {fresh.classes[0]}"):
        ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"])
    ds = ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"], on_missing_boxes="skip")
    assert ds.num_skipped == 1 and ds.skipped[0][0] == path


def test_malformed_xml_error_names_the_file(fresh):
    xml = os.path.join(fresh.boxes_dirs["val"], _stem(fresh.files["val"][1]) + ".xml")
    Path(xml).write_text("<annotation><object><name>n1</name>")
    with pytest.raises(ValueError, match="malformed bounding-box XML .*" + _stem(fresh.files["val"][1])):
        ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"], on_missing_boxes="skip")


@pytest.mark.parametrize("keep_bytes", [200, None])
def test_corrupt_jpeg_error_names_the_file(fresh, keep_bytes):
    victim = fresh.files["val"][3]
    corrupt_file(victim, keep_bytes)
    ds = ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"])
    ds[2]  # the others still load
    with pytest.raises(CorruptImageError, match=os.path.basename(victim)) as info:
        ds[3]
    assert "--skip-corrupt" in str(info.value) and "on_corrupt='skip'" in str(info.value)


def test_corrupt_jpeg_skip_is_counted_by_the_collate(fresh):
    victim = fresh.files["val"][3]
    corrupt_file(victim)
    ds = ImageNetWithBoxes(
        fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"], transform=eval_transform(8), on_corrupt="skip"
    )
    with pytest.warns(SkippedImageWarning, match=os.path.basename(victim)):
        assert ds[3] is None
    sizes = ds.original_sizes()
    assert sizes[3] == fresh.sizes[_stem(victim)]  # from the XML, no decode
    loader = DataLoader(
        ds, batch_sampler=SizeGroupedBatchSampler(sizes, 4, short_side=16), collate_fn=ds.collate_fn
    )
    with pytest.warns(UserWarning):
        batches = list(loader)
    assert sum(b.skipped for b in batches) == 1
    seen = torch.cat([b.indices for b in batches]).tolist()
    assert sorted(seen) == [i for i in range(len(ds)) if i != 3]


def test_empty_class_folder_error_names_the_folder(fresh):
    empty = os.path.join(fresh.root, "val", "n99999999")
    os.makedirs(empty)
    with pytest.raises(FileNotFoundError, match="n99999999.*allow_empty=True.*--allow-empty-classes"):
        ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"])
    from captum_consistency.engine.datasets import build_dataset

    with pytest.raises(FileNotFoundError, match="--allow-empty-classes"):
        build_dataset("imagenet", "val", "crop", 8, data_root=fresh.root)
    kept = build_dataset("imagenet", "val", "crop", 8, data_root=fresh.root, allow_empty=True)
    assert kept.classes[-1] == "n99999999" and len(kept.dataset) == len(fresh.files["val"])
    ds = ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"], allow_empty=True)
    assert ds.empty_classes == ["n99999999"]
    assert len(ds.classes) == 4 and ds.class_to_idx["n99999999"] == 3
    assert len(ds) == len(fresh.files["val"])


def test_given_classes_keep_indices_aligned_with_train(tmp_path):
    fx = make_imagenet_folder(tmp_path, num_classes=3, images_per_class=2)
    shutil.rmtree(os.path.join(fx.root, "val", fx.classes[1]))  # val lacks the middle class
    train = ImageNetWithBoxes(fx.root, "train")
    with pytest.raises(FileNotFoundError, match=fx.classes[1]):
        ImageNetWithBoxes(fx.root, "val", classes=train.classes)
    val = ImageNetWithBoxes(fx.root, "val", classes=train.classes, allow_empty=True)
    assert val.classes == train.classes and val.empty_classes == [fx.classes[1]]
    assert sorted(set(val.targets)) == [0, 2]  # without `classes`, class 2 would become 1
    os.makedirs(os.path.join(fx.root, "val", "n77777777", "x"))
    with pytest.raises(ValueError, match="n77777777"):
        ImageNetWithBoxes(fx.root, "val", classes=train.classes, allow_empty=True)


def test_xml_size_mismatch_raises_or_rescales(fresh):
    path = fresh.files["val"][0]
    h, w = fresh.sizes[_stem(path)]
    Image.open(path).convert("RGB").resize((w // 2, h // 2)).save(path, format="JPEG")
    ds = ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"])
    with pytest.raises(ValueError, match="on_size_mismatch='rescale'"):
        ds[0]
    ds = ImageNetWithBoxes(fresh.root, "val", boxes_dir=fresh.boxes_dirs["val"], on_size_mismatch="rescale")
    s = ds[0]
    assert s.size == (h // 2, w // 2)
    expected = torch.tensor([b[:4] for b in fresh.boxes[_stem(path)]], dtype=torch.float32) * torch.tensor(
        [(w // 2) / w, (h // 2) / h] * 2
    )
    torch.testing.assert_close(s.boxes, expected)
    assert ds.original_sizes()[0] == (h // 2, w // 2)  # read from the file, not the XML


def test_bad_arguments_are_named(inet):
    with pytest.raises(ValueError, match="on_missing_boxes"):
        ImageNetWithBoxes(inet.root, "val", on_missing_boxes="ignore")
    with pytest.raises(FileNotFoundError, match="nosplit"):
        ImageNetWithBoxes(inet.root, "nosplit")
    with pytest.raises(FileNotFoundError, match="boxes_dir"):
        ImageNetWithBoxes(inet.root, "val", boxes_dir=os.path.join(inet.root, "nope"))


def test_boxes_to_mask_hand_computed_and_against_torchray():
    boxes = torch.tensor([[1.0, 0.0, 2.0, 1.0], [3.0, 2.0, 9.0, 9.0]])
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[0:2, 1:3] = True
    expected[2:4, 3:5] = True  # clipped at the border
    assert torch.equal(boxes_to_mask(boxes, (4, 5)), expected)
    assert not boxes_to_mask(torch.zeros(0, 4), (3, 3)).any()

    from torchray.benchmark.datasets import _VOC_CLASS_TO_INDEX, voc_as_mask

    rng = np.random.default_rng(0)
    h, w = 30, 41
    objs, ours = [], []
    for _ in range(4):
        x1, y1 = int(rng.integers(0, w - 5)), int(rng.integers(0, h - 5))
        x2, y2 = int(rng.integers(x1, w)), int(rng.integers(y1, h))
        # TorchRay reads VOC's 1-based inclusive boxes; ours are 0-based inclusive.
        objs.append({"name": "dog", "bndbox": {"xmin": x1 + 1, "ymin": y1 + 1, "xmax": x2 + 1, "ymax": y2 + 1}})
        ours.append([x1, y1, x2, y2])
    objs.append({"name": "cat", "bndbox": {"xmin": 1, "ymin": 1, "xmax": 40, "ymax": 30}})
    label = {"annotation": {"size": {"width": w, "height": h}, "object": objs}}
    peer = voc_as_mask(label, _VOC_CLASS_TO_INDEX["dog"])
    assert torch.equal(boxes_to_mask(torch.tensor(ours, dtype=torch.float32), (h, w)), peer)


@pytest.mark.parametrize("size", [(375, 500), (500, 375), (333, 500), (64, 48), (100, 100), (17, 250)])
def test_eval_transform_resizes_the_short_side_to_2s_without_crop(size):
    h, w = size
    img = Image.fromarray(np.full((h, w, 3), 77, dtype=np.uint8))
    out = eval_transform(224)(img)
    assert tuple(out.shape[1:]) == resized_size(size, 448)
    assert min(out.shape[1:]) == 448
    assert abs(out.shape[2] / out.shape[1] - w / h) < 2 / 448 * max(w / h, h / w) + 1e-6
    expected = (77 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    assert resized_size((375, 500), 448) == (448, 597)


def test_train_transform_crops_flips_and_normalises():
    torch.manual_seed(0)
    t = train_transform(32)
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[..., 0] = 200
    arr[..., 1] = 10
    arr[..., 2] = 128
    out = t(Image.fromarray(arr))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (torch.tensor([200, 10, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5, rtol=0)
    # The crop is random: a horizontal ramp gives different crops across calls.
    ramp = Image.fromarray(np.tile(np.arange(60, dtype=np.uint8)[None, :, None] * 4, (40, 1, 3)))
    outs = torch.stack([t(ramp) for _ in range(8)])
    assert outs.std(dim=0).max() > 0.1
    kinds = {type(x).__name__ for x in t.transforms}
    assert {"RandomResizedCrop", "RandomHorizontalFlip", "Normalize"} <= kinds
    with pytest.raises(ValueError, match="image_size"):
        train_transform(0)


def test_size_grouped_batch_sampler_batches_equal_shapes_and_shards_ranks(inet):
    ds = ImageNetWithBoxes(inet.root, "val", boxes_dir=inet.boxes_dirs["val"], transform=eval_transform(12))
    sizes = ds.original_sizes()
    assert sizes == [inet.sizes[_stem(p)] for p in inet.files["val"]]
    sampler = SizeGroupedBatchSampler(sizes, 5, short_side=24)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert all(len(b) <= 5 for b in batches) and len(sampler) == len(batches) == 4  # 6 + 6 images
    for b in batches:
        assert len({resized_size(sizes[i], 24) for i in b}) == 1
    shards = [list(SizeGroupedBatchSampler(sizes, 5, short_side=24, num_replicas=3, rank=r)) for r in range(3)]
    flat = [i for s in shards for b in s for i in b]
    assert sorted(flat) == list(range(len(ds)))  # disjoint and complete, no padding
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate_fn)
    for batch in loader:
        assert isinstance(batch, ImageBatch)
        assert batch.images.shape[0] == len(batch.boxes) == len(batch.difficult) == batch.sizes.shape[0]
        assert min(batch.images.shape[2:]) == 24
        for j, idx in enumerate(batch.indices.tolist()):
            assert batch.targets[j] == ds.targets[idx]
            assert torch.equal(batch.boxes[j], ds.boxes(idx)[0])
    with pytest.raises(ValueError, match="rank"):
        SizeGroupedBatchSampler(sizes, 4, num_replicas=2, rank=2)


def test_collate_rejects_mixed_shapes_with_a_hint(inet):
    ds = ImageNetWithBoxes(inet.root, "val", boxes_dir=inet.boxes_dirs["val"], transform=eval_transform(8))
    with pytest.raises(ValueError, match="SizeGroupedBatchSampler"):
        collate_image_samples([ds[0], ds[1]])  # portrait and landscape
    empty = collate_image_samples([None, None])
    assert empty.skipped == 2 and empty.targets.numel() == 0


def test_v2_pipeline_matches_torchvision_resize_directly():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ours = eval_transform(16)(img)
    ref = v2.functional.resize(v2.functional.to_image(img), 32, antialias=True)
    ref = v2.functional.normalize(v2.functional.to_dtype(ref, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(ours, ref)
