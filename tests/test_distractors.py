"""Distractors: in-batch draws, the data-set sampler, the fallback, and their distributions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from captum_consistency.data import (
    DatasetDistractorSampler,
    DatasetWithDistractors,
    DistractorFallback,
    ImageNetWithBoxes,
    collate_image_samples,
    collate_with_distractors,
    gather_distractors,
    in_batch_distractors,
    sample_present_classes,
    train_transform,
)
from tests._fixtures_data import make_imagenet_folder


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


# A loose bound: the 99.999% quantile of chi-square with df degrees of freedom is below
# df + 7 sqrt(2 df) + 20 for the df used here, so a correct sampler fails with p < 1e-5, while a
# biased one (e.g. a class-uniform instead of image-uniform draw) fails by a wide margin.
def _chi_bound(df: int) -> float:
    return df + 7 * (2 * df) ** 0.5 + 20


def _check_rows(index, valid, qualify):
    n = qualify.shape[0]
    counts = qualify.sum(1)
    assert torch.equal(valid, counts >= 3)
    for i in range(n):
        row = index[i].tolist()
        if valid[i]:
            assert len(set(row)) == 3 and i not in row
            assert all(qualify[i, j] for j in row)
        else:
            assert row == [-1, -1, -1]


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=0, max_size=40),
    seed=st.integers(0, 2**31 - 1),
)
def test_in_batch_single_label_excludes_the_class(labels, seed):
    y = torch.tensor(labels, dtype=torch.long)
    index, valid = in_batch_distractors(y, generator=torch.Generator().manual_seed(seed))
    assert index.shape == (len(labels), 3) and index.dtype == torch.long and valid.dtype == torch.bool
    qualify = y.unsqueeze(0) != y.unsqueeze(1)
    _check_rows(index, valid, qualify)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 30),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_in_batch_multi_label_excludes_images_containing_the_class(data, n, k, seed):
    rows = data.draw(st.lists(st.lists(st.booleans(), min_size=k, max_size=k), min_size=n, max_size=n))
    targets = torch.tensor(rows, dtype=torch.bool).reshape(n, k)
    g = torch.tensor(data.draw(st.lists(st.integers(-1, k - 1), min_size=n, max_size=n)), dtype=torch.long)
    as_float = data.draw(st.booleans())
    index, valid = in_batch_distractors(
        targets.float() if as_float else targets, g, generator=torch.Generator().manual_seed(seed)
    )
    qualify = torch.ones(n, n, dtype=torch.bool)
    for i in range(n):
        if g[i] >= 0:
            qualify[i] = ~targets[:, g[i]]
        qualify[i, i] = False
    _check_rows(index, valid, qualify)


def test_in_batch_draw_is_uniform_over_qualifying_triples():
    y = torch.tensor([0, 0, 1, 2, 3, 4, 5, 0])  # sample 0: 5 qualifying mates (2..6)
    gen = torch.Generator().manual_seed(123)
    sets = {s: k for k, s in enumerate(itertools.combinations(range(2, 7), 3))}
    set_counts = np.zeros(len(sets))
    slot_counts = np.zeros((3, 5))
    draws = 3000
    for _ in range(draws):
        index, valid = in_batch_distractors(y, generator=gen)
        assert valid[0]
        row = index[0].tolist()
        set_counts[sets[tuple(sorted(row))]] += 1
        for slot, j in enumerate(row):
            slot_counts[slot, j - 2] += 1
    assert _chi_square(set_counts) < _chi_bound(len(sets) - 1)
    for slot in range(3):  # the order inside the triple is uniform too
        assert _chi_square(slot_counts[slot]) < _chi_bound(4)


def test_in_batch_requires_gradcam_targets_for_multi_hot_and_checks_inputs():
    with pytest.raises(ValueError, match="gradcam_targets is required"):
        in_batch_distractors(torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="integer class ids"):
        in_batch_distractors(torch.rand(4))
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        in_batch_distractors(torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="-1..2"):
        in_batch_distractors(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))


def test_gather_takes_images_from_the_batch():
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 2, 3, 3).clone()
    gen = torch.Generator().manual_seed(0)
    z, index, valid = gather_distractors(images, y, generator=gen, return_index=True)
    assert z.shape == (8, 3, 2, 3, 3) and valid.all()
    assert torch.equal(z, images[index])
    ids = z[:, :, 0, 0, 0].long()  # which batch member each distractor is
    assert (y[ids] != y[:, None]).all()


class _Recorder:
    def __init__(self, shape):
        self.shape, self.calls = shape, []

    def __call__(self, g):
        self.calls.append(g.clone())
        return torch.full((len(g), 3, *self.shape), -7.0)


def test_gather_uses_the_fallback_only_for_rows_without_candidates():
    y = torch.tensor([0, 0, 0, 0, 0, 1, 2])  # rows 0-4 have only 2 qualifying mates
    images = torch.randn(7, 1, 2, 2)
    rec = _Recorder((1, 2, 2))
    z = gather_distractors(images, y, fallback=rec, generator=torch.Generator().manual_seed(1))
    assert len(rec.calls) == 1 and rec.calls[0].tolist() == [0, 0, 0, 0, 0]
    assert (z[:5] == -7.0).all()
    assert not (z[5:] == -7.0).any()
    with pytest.raises(ValueError, match="5 of 7 samples have fewer than 3"):
        gather_distractors(images, y)
    with pytest.raises(ValueError, match="fallback must return"):
        gather_distractors(images, y, fallback=lambda g: torch.zeros(len(g), 3, 1, 1, 1))


def test_gather_multi_label_with_gradcam_targets():
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [0, 0, 1]], dtype=torch.float32)
    g = torch.tensor([0, 1, 1, 2, 2, 2])
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    rec = _Recorder((1, 1, 1))
    z = gather_distractors(images, targets, g, generator=torch.Generator().manual_seed(2), fallback=rec)
    # classes 1 and 2 are absent from 3 rows each: valid; class 0 row: 4 mates lack class 0
    assert rec.calls == []
    ids = z[:, :, 0, 0, 0].long()
    assert (targets[ids, g[:, None]] == 0).all()


def _brute_complement(targets: torch.Tensor, c: int) -> set:
    if targets.dim() == 1:
        return set(torch.nonzero(targets != c).flatten().tolist())
    return set(torch.nonzero(targets[:, c] == 0).flatten().tolist())


@settings(max_examples=50, deadline=None)
@given(data=st.data(), m=st.integers(3, 60), k=st.integers(1, 6), multi=st.booleans(), seed=st.integers(0, 2**31))
def test_dataset_sampler_excludes_the_class_and_draws_distinct_images(data, m, k, multi, seed):
    if multi:
        rows = data.draw(st.lists(st.lists(st.booleans(), min_size=k, max_size=k), min_size=m, max_size=m))
        targets = torch.tensor(rows, dtype=torch.bool).reshape(m, k)
    else:
        targets = torch.tensor(data.draw(st.lists(st.integers(0, k - 1), min_size=m, max_size=m)))
    sampler = DatasetDistractorSampler(targets, seed=seed, num_classes=None if multi else k)
    classes = [c for c in range(-1, k) if (m if c < 0 else len(_brute_complement(targets, c))) >= 3]
    if not classes:
        return
    g = torch.tensor(data.draw(st.lists(st.sampled_from(classes), min_size=1, max_size=20)))
    idx = sampler.sample(g, torch.Generator().manual_seed(seed))
    assert idx.shape == (len(g), 3) and idx.dtype == torch.long
    for row, c in zip(idx.tolist(), g.tolist()):
        assert len(set(row)) == 3
        allowed = set(range(m)) if c < 0 else _brute_complement(targets, c)
        assert set(row) <= allowed


@pytest.mark.parametrize("multi", [False, True])
def test_dataset_sampler_is_uniform_over_the_complement(multi):
    rng = np.random.default_rng(0)
    if multi:
        targets = torch.from_numpy(rng.random((40, 4)) < 0.3)
        c = 1
    else:
        # unbalanced classes: a class-uniform draw would visibly fail this test
        targets = torch.tensor([0] * 5 + [1] * 20 + [2] * 3 + [3] * 12)
        c = 1
    allowed = sorted(_brute_complement(targets, c))
    sampler = DatasetDistractorSampler(targets, seed=3)
    idx = sampler.sample(torch.full((4000,), c), torch.Generator().manual_seed(9))
    counts = np.bincount(idx.flatten().numpy(), minlength=len(targets))
    assert set(np.flatnonzero(counts)) == set(allowed)
    assert _chi_square(counts[allowed]) < _chi_bound(len(allowed) - 1)
    pair_equal = (idx[:, 0] == idx[:, 1]) | (idx[:, 0] == idx[:, 2]) | (idx[:, 1] == idx[:, 2])
    assert not pair_equal.any()


def test_dataset_sampler_streams_per_seed_rank_worker_and_epoch():
    targets = torch.arange(50) % 5
    g = torch.arange(64) % 5
    a = DatasetDistractorSampler(targets, seed=7, rank=0)
    b = DatasetDistractorSampler(targets, seed=7, rank=0)
    assert torch.equal(a.sample(g), b.sample(g))  # same stream
    r1 = DatasetDistractorSampler(targets, seed=7, rank=1)
    s8 = DatasetDistractorSampler(targets, seed=8, rank=0)
    fresh = DatasetDistractorSampler(targets, seed=7, rank=0)
    first = fresh.sample(g)
    assert not torch.equal(first, r1.sample(g))
    assert not torch.equal(first, s8.sample(g))
    e1 = DatasetDistractorSampler(targets, seed=7, rank=0)
    e1.set_epoch(1)
    assert not torch.equal(first, e1.sample(g))
    e1.set_epoch(0)
    assert torch.equal(first, e1.sample(g))  # back to the epoch-0 stream, from its start
    seeds = {fresh.stream_seed(worker=w, epoch=e, rank=r) for w in (None, 0, 1) for e in (0, 1) for r in (0, 1)}
    assert len(seeds) == 12
    with pytest.raises(ValueError, match="-1..4"):
        fresh.sample(torch.tensor([5]))


def test_dataset_sampler_rank_from_environment(monkeypatch):
    targets = torch.arange(30) % 3
    monkeypatch.setenv("RANK", "3")
    auto = DatasetDistractorSampler(targets, seed=1)
    assert auto.rank == 3
    assert torch.equal(auto.sample(torch.zeros(10, dtype=torch.long)),
                       DatasetDistractorSampler(targets, seed=1, rank=3).sample(torch.zeros(10, dtype=torch.long)))


def test_dataset_sampler_refuses_classes_without_enough_distractors():
    targets = torch.tensor([0, 0, 0, 0, 1, 1])
    sampler = DatasetDistractorSampler(targets)
    sampler.sample(torch.tensor([1]))
    with pytest.raises(ValueError, match=r"class\(es\) \[0\]"):
        sampler.sample(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="num_classes"):
        DatasetDistractorSampler(targets, num_classes=1)


class _Tiny(Dataset):
    """Images whose pixels are their own index, labels y = i % 4."""

    def __init__(self, n=24):
        self.targets = [i % 4 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), self.targets[i]


def test_loader_workers_get_different_reproducible_streams():
    ds = _Tiny()
    wrapped = DatasetWithDistractors(ds, DatasetDistractorSampler(ds.targets, seed=5, rank=0))

    def run():
        loader = DataLoader(wrapped, batch_size=4, num_workers=2, collate_fn=collate_with_distractors)
        return [(b[0][1], b[1][:, :, 0, 0, 0].long(), b[2]) for b in loader]

    first, second = run(), run()
    for (y, z, g), (_, z2, _) in zip(first, second):
        assert torch.equal(z, z2)  # reproducible
        assert torch.equal(g, y)
        ids = z
        assert (torch.tensor(ds.targets)[ids] != y[:, None]).all()
    # batches 0 and 1 come from workers 0 and 1, at the start of their streams, with the same
    # labels (i % 4): equal streams would give equal draws
    z_w0, z_w1 = first[0][1], first[1][1]
    assert not torch.equal(z_w0, z_w1)
    # and the worker streams differ from the main-process stream
    main = [wrapped[i][1][:, 0, 0, 0].long() for i in range(4)]
    assert not torch.equal(torch.stack(main), z_w0)


def test_fallback_loads_training_images_from_an_imagefolder(tmp_path):
    fx = make_imagenet_folder(tmp_path, num_classes=3, images_per_class=3, splits=("train",), boxes_splits=())
    train = ImageNetWithBoxes(fx.root, "train", transform=train_transform(8))
    fallback = DistractorFallback(train, DatasetDistractorSampler(train.targets, seed=0))
    images = torch.stack([train[i].image for i in range(4)])
    y = torch.tensor([train.targets[i] for i in range(4)])  # 0, 0, 0, 1: rows 0-2 lack mates
    z = gather_distractors(images, y, generator=torch.Generator().manual_seed(0), fallback=fallback)
    assert z.shape == (4, 3, 3, 8, 8)
    assert fallback.num_loaded == 9
    wrapped = DatasetWithDistractors(train, fallback.sampler)
    item = wrapped[0]
    assert item[1].shape == (3, 3, 8, 8) and item[2] == train.targets[0]
    batch, dz, g = collate_with_distractors(
        [wrapped[i] for i in range(3)], collate_fn=collate_image_samples
    )
    assert batch.images.shape == (3, 3, 8, 8) and dz.shape == (3, 3, 3, 8, 8) and g.tolist() == [0, 0, 0]
    # A bool mask is not a list of classes (it would read as the classes 0 and 1).
    for call in (lambda: fallback(torch.tensor([True, False])),
                 lambda: gather_distractors(images, y, torch.tensor([True, True, False, False]), fallback=fallback),
                 lambda: fallback.sampler.sample(torch.tensor([True]))):
        with pytest.raises(TypeError, match="bool"):
            call()


def test_sample_present_classes_draws_a_present_class_uniformly():
    targets = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_present_classes(targets, gen) for _ in range(1500)])
    assert draws.dtype == torch.long and (draws[:, 2] == 1).all()
    counts = np.bincount(draws[:, 0].numpy(), minlength=4)
    assert counts[1] == 0
    assert _chi_square(counts[[0, 2, 3]]) < _chi_bound(2)
    # A row without any class (an unannotated image) draws uniformly among all classes.
    assert _chi_square(np.bincount(draws[:, 1].numpy(), minlength=4)) < _chi_bound(3)
    with pytest.raises(ValueError, match="multi-hot"):
        sample_present_classes(torch.tensor([0, 1]))


def test_both_distractor_schemes_regularise_an_unlabelled_image_alike():
    """``--distractors batch`` (the training loop's sample_positive_class) and ``--distractors
    dataset`` (DatasetWithDistractors) choose the regularised class of a multi-label image by
    one rule, also for an image without labels: the same draws from the same stream."""
    from captum_consistency.engine import sample_positive_class

    targets = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
    for seed in range(10):
        batch_rule = sample_positive_class(targets, torch.Generator().manual_seed(seed))
        assert torch.equal(batch_rule, sample_present_classes(targets, torch.Generator().manual_seed(seed)))
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    data = list(zip(images, targets))
    drawn = set()
    for seed in range(40):
        sampler = DatasetDistractorSampler(targets, seed=seed, rank=0)
        stream = torch.Generator().manual_seed(sampler.stream_seed())
        expected = int(sample_present_classes(targets[:1], stream)[0])
        _, distractors, regularised = DatasetWithDistractors(data, sampler)[0]
        assert regularised == expected
        assert not targets[distractors[:, 0, 0, 0].long(), regularised].any()
        drawn.add(regularised)
    assert drawn == {0, 1, 2, 3}


def test_one_check_of_the_regularised_classes():
    """The distractor functions, the sampler, the fallback and the training loop check the
    regularised classes with one function, so they refuse the same inputs with the same words."""
    from captum_consistency.engine.training import _check_gradcam_targets

    sampler = DatasetDistractorSampler(torch.tensor([0, 1, 2, 0, 1, 2]), seed=0, rank=0)
    fallback = DistractorFallback(list(torch.zeros(6, 3, 2, 2)), sampler)
    checks = (lambda g: in_batch_distractors(torch.zeros(4, 3), g), sampler.sample, fallback)
    for call in checks + (_check_gradcam_targets,):
        with pytest.raises(TypeError, match="must be an integer tensor .*bool mask"):
            call(torch.tensor([True, False, True, False]))
    for call in checks:
        with pytest.raises(ValueError, match=r"must lie in -1\.\.2 .*got values in \[0, 3\]"):
            call(torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        sampler.sample(torch.zeros(2, 2, dtype=torch.long))
