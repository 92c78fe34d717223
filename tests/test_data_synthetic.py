"""Tests of the procedural spurious-context data set, captum_consistency.data.synthetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency, chisquare
from skimage.measure import euler_number
from torch.utils.data import DataLoader
from torchvision.ops import masks_to_boxes

from captum_consistency.data import SpuriousContextShapes, SyntheticSample
from captum_consistency.data.synthetic import SHAPES


def _np(sample: SyntheticSample, field: str) -> np.ndarray:
    return getattr(sample, field).numpy()


# ------------------------------------------------------------------------------ ground truth


@pytest.mark.parametrize("image_size", [32, 64, 97])
def test_masks_are_exactly_the_drawn_pixels_on_a_flat_background(image_size):
    # clutter=0 gives a flat grey background: everything that differs from it was drawn, and
    # must be covered by exactly one of the object, cue and stray-cue masks.
    ds = SpuriousContextShapes(
        "train", num_classes=10, image_size=image_size, clutter=0.0, stray_cue_prob=0.5,
        length=60, seed=3, normalize=False,
    )  # fmt: skip
    for i in range(len(ds)):
        s = ds.sample(i)
        rgb = ds.rgb(i)
        mask, cue, stray = _np(s, "mask"), _np(s, "cue_mask"), _np(s, "stray_mask")
        assert mask.any() and cue.any()
        assert not (mask & cue).any() and not (mask & stray).any() and not (cue & stray).any()
        drawn = mask | cue | stray
        background = rgb[~drawn]
        bg = background[0]
        assert (background == bg).all(), f"sample {i}: background outside the masks is not flat"
        differs = (rgb != bg).any(axis=-1)
        np.testing.assert_array_equal(differs, drawn, err_msg=f"sample {i}")
        # The object is a single filled colour region plus shading: no pixel is cue-black.
        assert (rgb[mask].max(axis=-1) > 0.3).all()


def test_clutter_changes_the_background_only():
    # Geometry and clutter use separate streams: the same index with and without clutter has
    # identical masks, and identical object and cue pixels (opaque, drawn over the clutter).
    kw = dict(split="test", num_classes=10, length=40, seed=11, normalize=False)
    clean = SpuriousContextShapes(clutter=0.0, **kw)
    busy = SpuriousContextShapes(clutter=1.0, **kw)
    changed = 0
    for i in range(len(clean)):
        a, b = clean.sample(i), busy.sample(i)
        for field in ("mask", "cue_mask", "stray_mask", "box", "cue_box"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (i, field)
        assert (a.label, a.cue_label, a.stray_label) == (b.label, b.cue_label, b.stray_label)
        drawn = _np(a, "mask") | _np(a, "cue_mask") | _np(a, "stray_mask")
        ra, rb = clean.rgb(i), busy.rgb(i)
        np.testing.assert_array_equal(ra[drawn], rb[drawn])
        changed += int((ra[~drawn] != rb[~drawn]).any(axis=-1).mean() > 0.5)
    assert changed == len(clean)  # the clutter really does change most background pixels


def test_boxes_are_tight_bounds_of_the_masks():
    ds = SpuriousContextShapes("val", num_classes=6, length=50, seed=5)
    for i in range(len(ds)):
        s = ds.sample(i)
        for mask, box in ((s.mask, s.box), (s.cue_mask, s.cue_box)):
            rows = np.flatnonzero(mask.numpy().any(axis=1))
            cols = np.flatnonzero(mask.numpy().any(axis=0))
            expected = [cols.min(), rows.min(), cols.max(), rows.max()]
            assert s.box.dtype == torch.int64
            assert box.tolist() == expected
            # Peer: torchvision's convention (x1, y1, x2, y2), x2/y2 inclusive.
            assert masks_to_boxes(mask[None]).long()[0].tolist() == expected


def test_cue_sits_beside_the_object():
    ds = SpuriousContextShapes("train", num_classes=10, length=200, seed=2)
    max_gap = round(0.04 * ds.image_size)
    sides = set()
    for i in range(len(ds)):
        s = ds.sample(i)
        x1, y1, x2, y2 = s.box.tolist()
        cx1, cy1, cx2, cy2 = s.cue_box.tolist()
        gaps = {"left": x1 - cx2 - 1, "right": cx1 - x2 - 1, "top": y1 - cy2 - 1, "bottom": cy1 - y2 - 1}
        side = [k for k, g in gaps.items() if 1 <= g <= max_gap]
        assert len(side) == 1, (i, gaps)
        if side[0] in ("left", "right"):
            assert cy1 <= y2 and cy2 >= y1  # overlaps the object's rows
        else:
            assert cx1 <= x2 and cx2 >= x1
        sides.add(side[0])
        assert cx2 - cx1 + 1 == round(0.17 * ds.image_size)
    assert sides == {"left", "right", "top", "bottom"}


def test_shapes_follow_their_class():
    ds = SpuriousContextShapes("train", num_classes=10, length=400, seed=9, clutter=0.0)
    disk, ring, other = SHAPES.index("disk"), SHAPES.index("ring"), SHAPES.index("square")
    seen = set()
    for i in range(len(ds)):
        if ds.targets[i] not in (disk, ring, other):
            continue
        m = ds.sample(i).mask.numpy()
        seen.add(ds.targets[i])
        x1, y1, x2, y2 = ds.sample(i).box.tolist()
        fill = m.sum() / ((x2 - x1 + 1) * (y2 - y1 + 1))
        if ds.targets[i] == disk:
            assert abs(fill - math.pi / 4) < 0.06 and euler_number(m, connectivity=2) == 1
        elif ds.targets[i] == ring:
            assert euler_number(m, connectivity=2) == 0  # one object with one hole
        else:
            assert euler_number(m, connectivity=2) == 1 and fill > 0.45
    assert seen == {disk, ring, other}


def test_cue_pattern_is_class_specific():
    # The same cue class gives the same hue; different cue classes give different hues.
    ds = SpuriousContextShapes("test", num_classes=5, length=120, seed=4, normalize=False)
    hue = {}
    for i in range(len(ds)):
        s = ds.sample(i)
        patch = ds.rgb(i)[_np(s, "cue_mask")]
        bright = patch[patch.max(axis=-1) > 0.5].mean(axis=0)
        hue.setdefault(s.cue_label, []).append(bright)
    assert sorted(hue) == list(range(5))
    centres = {c: np.mean(v, axis=0) for c, v in hue.items()}
    for c, v in hue.items():
        assert np.abs(np.asarray(v) - centres[c]).max() < 0.05
    cs = np.stack([centres[c] for c in range(5)])
    dists = np.linalg.norm(cs[:, None] - cs[None], axis=-1) + np.eye(5)
    assert dists.min() > 0.3


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**63 - 1),
    index=st.integers(0, 999),
    image_size=st.integers(32, 80),
    num_classes=st.integers(2, 10),
    split=st.sampled_from(["train", "val", "test"]),
)
def test_invariants_for_any_knobs(seed, index, image_size, num_classes, split):
    ds = SpuriousContextShapes(
        split, num_classes=num_classes, image_size=image_size, length=1000, seed=seed
    )
    s = ds.sample(index)
    n = image_size
    assert s.image.shape == (3, n, n) and s.image.dtype == torch.float32
    assert torch.isfinite(s.image).all()
    for m in (s.mask, s.cue_mask, s.stray_mask):
        assert m.shape == (n, n) and m.dtype == torch.bool
    assert s.mask.any() and s.cue_mask.any()
    assert not (s.mask & (s.cue_mask | s.stray_mask)).any()
    assert s.stray_mask.any() == (s.stray_label >= 0)
    assert (s.label, s.cue_label) == (ds.targets[index], ds.cue_targets[index])
    assert s.cue_consistent == (s.label == s.cue_label) == bool(ds.cue_consistent[index])
    assert 0 <= s.label < num_classes and 0 <= s.cue_label < num_classes
    assert s.box.tolist() == masks_to_boxes(s.mask[None]).long()[0].tolist()


# ------------------------------------------------------------------------------ determinism


def test_same_index_gives_the_same_sample_whatever_the_length_or_cache():
    a = SpuriousContextShapes("train", length=30, seed=7)
    b = SpuriousContextShapes("train", length=500, seed=7, cache=True)
    for i in (0, 5, 29):
        sa, sb, sb2 = a.sample(i), b.sample(i), b.sample(i)  # sb2 comes from the cache
        for x, y, z in zip(sa, sb, sb2):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y) and torch.equal(y, z)
            else:
                assert x == y == z
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert torch.equal(a[-1][0], a[29][0])
    assert a.targets == b.targets[:30] and a.cue_targets == b.cue_targets[:30]


def test_seeds_and_splits_give_different_images():
    base = SpuriousContextShapes("train", length=20, seed=0)
    other_seed = SpuriousContextShapes("train", length=20, seed=1)
    other_split = SpuriousContextShapes("val", length=20, seed=0)
    for other in (other_seed, other_split):
        same = sum(torch.equal(base[i][0], other[i][0]) for i in range(20))
        assert same == 0
        assert base.targets != other.targets


def test_cache_memoises_rendering():
    ds = SpuriousContextShapes("test", length=10, cache=True)
    calls = []
    render = ds._render
    ds._render = lambda i: calls.append(i) or render(i)
    ds[3], ds[3], ds.sample(3), ds.rgb(3)
    assert calls == [3]
    view = ds.with_annotations()
    view[3]
    assert calls == [3]  # the view shares the cache


# ------------------------------------------------------------------------------ statistics


def test_test_split_cue_is_independent_of_the_class():
    k = 5
    ds = SpuriousContextShapes("test", num_classes=k, length=20_000, seed=0, cue_strength=0.95)
    y, c = np.asarray(ds.targets), np.asarray(ds.cue_targets)
    table = np.zeros((k, k))
    np.add.at(table, (y, c), 1)
    assert chi2_contingency(table).pvalue > 1e-3
    assert chisquare(np.bincount(y, minlength=k)).pvalue > 1e-3
    assert chisquare(np.bincount(c, minlength=k)).pvalue > 1e-3
    # About (K - 1) / K of the test images are cue-conflicting.
    n, p = len(ds), (k - 1) / k
    conflicting = ds.conflicting_indices()
    assert abs(len(conflicting) - n * p) < 4 * math.sqrt(n * p * (1 - p))
    both = torch.cat([ds.consistent_indices(), conflicting]).sort().values
    assert torch.equal(both, torch.arange(n))
    assert not ds.cue_consistent[conflicting].any() and ds.cue_consistent[ds.consistent_indices()].all()
    # cue_strength does not leak into the test split.
    other = SpuriousContextShapes("test", num_classes=k, length=20_000, seed=0, cue_strength=0.1)
    assert other.cue_targets == ds.cue_targets


@pytest.mark.parametrize("cue_strength", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("split", ["train", "val"])
def test_train_split_cue_matches_class_with_probability_cue_strength(split, cue_strength):
    k, n = 4, 20_000
    ds = SpuriousContextShapes(split, num_classes=k, length=n, seed=1, cue_strength=cue_strength)
    y, c = np.asarray(ds.targets), np.asarray(ds.cue_targets)
    rate = (y == c).mean()
    assert abs(rate - cue_strength) <= 4 * math.sqrt(cue_strength * (1 - cue_strength) / n) + 1e-12
    # A mismatched cue is uniform over the other K - 1 classes.
    offset = (c - y)[y != c] % k
    if offset.size:
        assert offset.min() >= 1 and chisquare(np.bincount(offset, minlength=k)[1:]).pvalue > 1e-3
    if 0.5 <= cue_strength < 1.0:
        table = np.zeros((k, k))
        np.add.at(table, (y, c), 1)
        assert chi2_contingency(table).pvalue < 1e-12  # strongly dependent, unlike "test"


def test_stray_cues_appear_at_the_requested_rate():
    ds = SpuriousContextShapes("train", num_classes=4, length=400, seed=8, stray_cue_prob=0.5)
    strays = np.array([ds.sample(i).stray_label for i in range(len(ds))])
    rate = (strays >= 0).mean()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / len(ds)) + 0.02  # rare placement failures
    assert set(strays[strays >= 0]) == {0, 1, 2, 3}
    none = SpuriousContextShapes("train", length=50, seed=8, stray_cue_prob=0.0)
    assert all(not none.sample(i).stray_mask.any() for i in range(50))


# ------------------------------------------------------------------------------ format


def test_sample_format_and_normalisation():
    raw = SpuriousContextShapes("train", length=8, seed=0, normalize=False)
    norm = SpuriousContextShapes("train", length=8, seed=0)
    x, y = raw[0]
    assert isinstance(y, int) and x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(torch.round(x * 255) / 255, x)  # 8-bit images
    np.testing.assert_array_equal(raw.rgb(0), x.permute(1, 2, 0).numpy())
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    torch.testing.assert_close(norm[0][0], (x - mean) / std)
    batch = torch.stack([norm[i][0] for i in range(8)])
    torch.testing.assert_close(norm.denormalize(batch), torch.stack([raw[i][0] for i in range(8)]))
    torch.testing.assert_close(raw.denormalize(x), x)
    with pytest.raises(ValueError, match="images"):
        norm.denormalize(torch.zeros(1, 64, 64))
    assert norm.classes == list(SHAPES[:4]) and len(norm) == 8
    assert "SpuriousContextShapes(split='train'" in repr(norm)


def test_default_collate_batches_plain_and_annotated_samples():
    ds = SpuriousContextShapes("test", length=10, seed=0)
    images, labels = next(iter(DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 64, 64) and labels.dtype == torch.int64
    assert labels.tolist() == ds.targets[:4]
    view = ds.with_annotations()
    assert not ds.annotations and isinstance(view[0], SyntheticSample)
    batch = next(iter(DataLoader(view, batch_size=4)))
    assert isinstance(batch, SyntheticSample)
    assert batch.image.shape == (4, 3, 64, 64) and torch.equal(batch.image, images)
    assert batch.mask.shape == (4, 64, 64) and batch.mask.dtype == torch.bool
    assert batch.box.shape == (4, 4) and batch.cue_box.shape == (4, 4)
    assert batch.cue_consistent.dtype == torch.bool
    assert batch.cue_consistent.tolist() == ds.cue_consistent[:4].tolist()
    assert batch.index.tolist() == [0, 1, 2, 3]


def test_default_lengths_per_split():
    assert [len(SpuriousContextShapes(s)) for s in ("train", "val", "test")] == [10_000, 1_000, 2_000]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(split="training"), "split"),
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=len(SHAPES) + 1), "num_classes"),
        (dict(image_size=31), "image_size"),
        (dict(cue_strength=1.5), "cue_strength"),
        (dict(cue_strength=-0.1), "cue_strength"),
        (dict(cue_strength=float("nan")), "cue_strength"),
        (dict(stray_cue_prob=2.0), "stray_cue_prob"),
        (dict(clutter=-1.0), "clutter"),
        (dict(clutter="high"), "clutter"),
        (dict(length=0), "length"),
        (dict(length=2.5), "length"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_knobs_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SpuriousContextShapes(**kwargs)


@pytest.mark.parametrize("kwargs, name", [(dict(num_classes=2.0), "num_classes"), (dict(image_size="64"), "image_size")])
def test_wrong_types_raise_type_error(kwargs, name):
    with pytest.raises(TypeError, match=name):
        SpuriousContextShapes(**kwargs)


def test_bad_index():
    ds = SpuriousContextShapes(length=5)
    with pytest.raises(IndexError, match="index 5"):
        ds[5]
    with pytest.raises(IndexError):
        ds.sample(-6)
    with pytest.raises(TypeError, match="index"):
        ds[1.0]


def test_subset_of_conflicting_images():
    test = SpuriousContextShapes("test", length=40, seed=0)
    conflicting = torch.utils.data.Subset(test.with_annotations(), test.conflicting_indices())
    assert 0 < len(conflicting) < 40
    for i in range(len(conflicting)):
        s = conflicting[i]  # the Subset indexes with 0-d tensors
        assert not s.cue_consistent and s.label != s.cue_label
        assert s.index == int(test.conflicting_indices()[i])


# ------------------------------------------------------------------- cue_prob and object_size


def test_cue_prob_zero_removes_the_cue_and_nothing_else():
    # The cue's geometry is drawn whether or not it is painted: with cue_prob=0 every pixel
    # outside the cue patch is the same as with cue_prob=1 (object, clutter, stray cue).
    kw = dict(split="test", num_classes=4, length=30, seed=5, normalize=False)
    with_cue = SpuriousContextShapes(cue_prob=1.0, **kw)
    without = SpuriousContextShapes(cue_prob=0.0, **kw)
    assert without.cue_targets == [-1] * 30
    assert len(without.consistent_indices()) == len(without.conflicting_indices()) == 0
    assert with_cue.targets == without.targets
    for i in range(len(without)):
        a, b = with_cue.sample(i), without.sample(i)
        assert b.cue_label == -1 and not b.cue_consistent
        assert not b.cue_mask.any() and b.cue_box.tolist() == [-1, -1, -1, -1]
        assert torch.equal(a.mask, b.mask) and torch.equal(a.stray_mask, b.stray_mask)
        outside = ~a.cue_mask
        np.testing.assert_array_equal(with_cue.rgb(i)[outside.numpy()], without.rgb(i)[outside.numpy()])


def test_cue_prob_keeps_the_cue_classes_of_the_images_that_keep_a_cue():
    kw = dict(split="train", num_classes=5, length=2000, seed=2, cue_strength=0.9)
    full = np.asarray(SpuriousContextShapes(cue_prob=1.0, **kw).cue_targets)
    half = np.asarray(SpuriousContextShapes(cue_prob=0.5, **kw).cue_targets)
    kept = half >= 0
    assert abs(kept.mean() - 0.5) < 4 * math.sqrt(0.25 / 2000)  # binomial, 4 sigma
    np.testing.assert_array_equal(half[kept], full[kept])


@pytest.mark.parametrize("object_size", [(0.2, 0.3), (0.35, 0.45)])
def test_object_size_sets_the_circumradius(object_size):
    n = 48
    ds = SpuriousContextShapes("test", num_classes=10, image_size=n, cue_prob=0.0,
                               stray_cue_prob=0.0, object_size=object_size, length=40, seed=1)
    lo, hi = object_size
    for i in range(len(ds)):
        s = ds.sample(i)
        x1, y1, x2, y2 = s.box.tolist()
        extent = max(x2 - x1, y2 - y1) + 1
        assert extent <= 2 * hi * n + 2, (i, extent)  # every shape lies within its circumradius
        assert s.mask.any() and (s.mask.sum() >= 0.2 * (lo * n) ** 2), i


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(object_size=(0.3, 0.2)), "object_size"),
        (dict(object_size=(0.01, 0.2)), "object_size"),
        (dict(object_size=0.2), "object_size"),
        (dict(object_size=(0.2, 0.3)), "cue_prob"),  # no room for the cue beside the object
        (dict(cue_prob=1.5), "cue_prob"),
    ],
)
def test_cue_prob_and_object_size_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpuriousContextShapes("train", **kwargs)
