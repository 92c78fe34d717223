"""Shared composites: the grouping (shared_composite_groups) and GradCamConsistencyLoss(composites="shared").

The central check (issue: "same terms"): in eval mode, in float64, each image's Eq. 5 term and
the parameter gradients of the shared mode equal those of the per-image mode given the same
composites (the other three images of the composite as distractors, the same cells), on a
ResNet and on a multi-label batch.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from captum_consistency import GradCamConsistencyLoss, split_grid, to_global_max_pool
from captum_consistency.data import shared_composite_groups
from captum_consistency.engine import ScaledBCEWithLogitsLoss, sample_positive_class


def resnet(num_classes=8, gmp=False, seed=0):
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    return to_global_max_pool(model) if gmp else model


def _exclusive(groups, targets, gradcam_targets):
    """Brute force: no image contains the regularised class of a composite mate."""
    for row in groups.tolist():
        for a, b in itertools.permutations(row, 2):
            c = int(gradcam_targets[a])
            if c < 0:
                continue
            has = targets[b] == c if targets.dim() == 1 else targets[b, c] != 0
            if bool(has):
                return False
    return True


def _check_grouping(groups, cells, n):
    assert groups.dtype == torch.long and cells.dtype == torch.long
    assert groups.dim() == 2 and groups.shape[1] == 4 and cells.shape == (n,)
    flat = groups.flatten()
    assert flat.unique().numel() == flat.numel()  # each image at most once
    assert bool(((flat >= 0) & (flat < n)).all())
    assert torch.equal(cells[groups], torch.arange(4).expand_as(groups))  # column = cell
    assert bool(((cells >= 0) & (cells < 4)).all())


def _optimal_single_label(labels):
    """Most images that disjoint groups of 4 distinct classes can hold (brute force, tiny N)."""
    n = len(labels)
    quads = [q for q in itertools.combinations(range(n), 4) if len({labels[i] for i in q}) == 4]
    best = 0

    def search(start, used, count):
        nonlocal best
        best = max(best, count)
        if count + (n - len(used)) // 4 <= best:
            return
        for j in range(start, len(quads)):
            if not used & set(quads[j]):
                search(j + 1, used | set(quads[j]), count + 1)

    search(0, frozenset(), 0)
    return 4 * best


# ---------------------------------------------------------------------------- the grouping


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=0, max_size=40),
    num_classes=st.integers(1, 10),
    seed=st.integers(0, 2**31),
)
def test_single_label_groups_are_valid_and_as_many_as_the_class_counts_allow(labels, num_classes, seed):
    y = torch.tensor([v % num_classes for v in labels], dtype=torch.long)
    n = y.numel()
    groups, cells = shared_composite_groups(y, generator=torch.Generator().manual_seed(seed))
    _check_grouping(groups, cells, n)
    assert bool((y[groups].sort(dim=1).values.diff(dim=1) != 0).all())  # four distinct classes
    # G groups hold at most G images of a class: the largest G with sum_c min(n_c, G) >= 4G.
    counts = torch.bincount(y, minlength=1)
    best = max(g for g in range(n // 4 + 1) if int(torch.clamp(counts, max=g).sum()) >= 4 * g)
    assert groups.shape[0] == best


@pytest.mark.parametrize("seed", range(12))
def test_single_label_grouping_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 11))
    labels = rng.integers(0, int(rng.integers(2, 6)), n).tolist()
    groups, _ = shared_composite_groups(torch.tensor(labels), generator=torch.Generator().manual_seed(seed))
    assert groups.numel() == _optimal_single_label(labels)


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(0, 40),
    num_classes=st.integers(1, 8),
    density=st.floats(0.0, 0.7),
    empty_as_minus_one=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_multilabel_groups_respect_the_distractor_rule(n, num_classes, density, empty_as_minus_one, seed):
    g = torch.Generator().manual_seed(seed)
    multi_hot = (torch.rand(n, num_classes, generator=g) < density).long()  # rows may be empty
    regularised = sample_positive_class(multi_hot, g) if n else torch.zeros(0, dtype=torch.long)
    if empty_as_minus_one and n:
        regularised = torch.where(multi_hot.any(1), regularised, torch.full_like(regularised, -1))
    groups, cells = shared_composite_groups(multi_hot, regularised, generator=g)
    _check_grouping(groups, cells, n)
    assert _exclusive(groups, multi_hot, regularised)


def test_multilabel_grouping_with_a_dominant_class():
    # COCO-like: one class in ~45% of the images, a few common ones, many rare ones. Each
    # composite must keep the dominant class to one image unless none regularises it; most
    # images still find a composite.
    g = torch.Generator().manual_seed(0)
    freq = torch.full((80,), 0.03)
    freq[0], freq[1:6] = 0.45, 0.1
    grouped = total = 0
    for _ in range(10):
        multi_hot = (torch.rand(64, 80, generator=g) < freq).long()
        regularised = sample_positive_class(multi_hot, g)
        groups, cells = shared_composite_groups(multi_hot, regularised, generator=g)
        _check_grouping(groups, cells, 64)
        assert _exclusive(groups, multi_hot, regularised)
        grouped, total = grouped + groups.numel(), total + 64
    assert grouped / total > 0.75


def test_grouping_is_seeded_by_the_generator():
    y = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(1))
    a = shared_composite_groups(y, generator=torch.Generator().manual_seed(7))
    b = shared_composite_groups(y, generator=torch.Generator().manual_seed(7))
    c = shared_composite_groups(y, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_distinct_classes_give_a_uniform_partition_and_uniform_cells():
    # With all classes distinct every image's three composite mates are a uniform triple of
    # its batch mates (the in-batch distractors' distribution) and its cell is uniform.
    n, draws = 8, 3000
    y = torch.arange(n)
    g = torch.Generator().manual_seed(0)
    cell_counts = np.zeros((n, 4))
    pair_counts = np.zeros((n, n))
    for _ in range(draws):
        groups, cells = shared_composite_groups(y, generator=g)
        assert groups.shape == (2, 4)
        cell_counts[np.arange(n), cells.numpy()] += 1
        for row in groups.tolist():
            for a, b in itertools.permutations(row, 2):
                pair_counts[a, b] += 1
    expected_cell = draws / 4
    assert np.abs(cell_counts - expected_cell).max() < 6 * math.sqrt(expected_cell)
    off = pair_counts[~np.eye(n, dtype=bool)]
    expected_pair = draws * 3 / (n - 1)  # 3 mates among 7 others
    assert np.abs(off - expected_pair).max() < 6 * math.sqrt(expected_pair)


def test_grouping_bad_input():
    with pytest.raises(ValueError, match="gradcam_targets is required"):
        shared_composite_groups(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="integer class ids"):
        shared_composite_groups(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        shared_composite_groups(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------- same terms


def _per_image_distractors(x, groups, cells, extra=None):
    """Distractors of per-image mode that rebuild the shared composites exactly.

    For the image in cell k of composite r: the other three images of the row, in increasing
    cell order (compose_grid fills the remaining cells in that order). Rows of ungrouped
    images come from ``extra``.
    """
    z = torch.zeros(x.shape[0], 3, *x.shape[1:], dtype=x.dtype) if extra is None else extra.clone()
    for row in groups.tolist():
        for k, i in enumerate(row):
            assert int(cells[i]) == k
            z[i] = x[[row[c] for c in range(4) if c != k]]
    return z


def _grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _assert_same_terms(shared, per_image, model):
    torch.testing.assert_close(shared.per_image_consistency, per_image.per_image_consistency, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(shared.composite_saliency, per_image.composite_saliency, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(shared.saliency, per_image.saliency)
    torch.testing.assert_close(shared.classification, per_image.classification)
    torch.testing.assert_close(shared.loss, per_image.loss, rtol=1e-10, atol=1e-12)
    assert torch.equal(shared.cells, per_image.cells)
    for name, a, b in zip([n for n, _ in model.named_parameters()], _grads(shared.loss, model), _grads(per_image.loss, model)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("gmp", [False, True])
def test_shared_terms_and_gradients_equal_per_image_mode_on_a_resnet(gmp):
    model = resnet(num_classes=10, gmp=gmp).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 64, 64, generator=g, dtype=torch.float64)
    y = torch.tensor([3, 0, 5, 1, 2, 7, 4, 6, 3, 3])
    groups = torch.tensor([[1, 4, 3, 0], [5, 7, 2, 6]])  # images 8 and 9 are ungrouped
    extra = torch.randn(10, 3, 3, 64, 64, generator=g, dtype=torch.float64)
    extra[8] = x[[1, 2, 4]]  # distractors of the ungrouped images (class 3): other classes
    extra[9] = x[[5, 6, 7]]
    cells = torch.tensor([3, 0, 2, 2, 1, 0, 3, 1, 1, 2])
    shared = GradCamConsistencyLoss(model, model.layer4, lam=25.0, composites="shared")
    out_s = shared(x, y, extra, cells=cells, groups=groups)
    assert out_s.num_ungrouped == 2 and torch.equal(out_s.groups, groups)
    assert out_s.composite_saliency.shape == (10, 1, 4, 4)
    z = _per_image_distractors(x, groups, cells, extra)
    out_p = GradCamConsistencyLoss(model, model.layer4, lam=25.0)(x, y, z, cells=cells)
    assert out_p.num_ungrouped == 10 and out_p.groups.shape == (0, 4)
    _assert_same_terms(out_s, out_p, model)
    assert out_s.consistency.item() > 0


def test_shared_terms_and_gradients_equal_per_image_mode_multilabel():
    model = resnet(num_classes=6).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 64, 64, generator=g, dtype=torch.float64)
    multi_hot = torch.tensor(
        [
            [1, 0, 0, 0, 1, 0],
            [0, 1, 0, 0, 1, 0],
            [0, 0, 1, 0, 0, 1],
            [0, 0, 0, 1, 0, 1],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0],  # no positive class
        ],
        dtype=torch.float64,
    )
    regularised = torch.tensor([0, 1, 2, 3, 1, 2, 4, 5])
    groups = torch.tensor([[0, 1, 2, 3], [7, 6, 5, 4]])
    criterion = ScaledBCEWithLogitsLoss(6.0)
    shared = GradCamConsistencyLoss(model, model.layer4, lam=1.0, criterion=criterion, composites="shared")
    out_s = shared(x, multi_hot, gradcam_targets=regularised, groups=groups)
    assert out_s.num_ungrouped == 0
    z = _per_image_distractors(x, groups, out_s.cells)
    per_image = GradCamConsistencyLoss(model, model.layer4, lam=1.0, criterion=criterion)
    out_p = per_image(x, multi_hot, z, cells=out_s.cells, gradcam_targets=regularised)
    _assert_same_terms(out_s, out_p, model)


# ---------------------------------------------------------------------------- composites


def _capture_composites(model):
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen, handle


def test_composites_hold_the_groups_and_in_batch_distractors_for_the_ungrouped():
    model = resnet(num_classes=8).eval()
    x = torch.randn(10, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7, 7])  # class 7 three times: at most 2 groups
    loss_fn = GradCamConsistencyLoss(model, model.layer4, composites="shared",
                                     generator=torch.Generator().manual_seed(0))
    seen, handle = _capture_composites(model)
    out = loss_fn(x, y)
    handle.remove()
    composites = split_grid(seen[1])  # (M, 4, C, H, W); seen[0] is the single images
    groups = out.groups
    assert groups.shape == (2, 4) and out.num_ungrouped == 2 and composites.shape[0] == 4
    for r, row in enumerate(groups.tolist()):
        for k, i in enumerate(row):
            assert torch.equal(composites[r, k], x[i])
    ungrouped = sorted(set(range(10)) - set(groups.flatten().tolist()))
    for m, i in enumerate(ungrouped):
        cell = int(out.cells[i])
        assert torch.equal(composites[2 + m, cell], x[i])
        for k in set(range(4)) - {cell}:
            # a distractor: an image of the batch of another class
            match = [j for j in range(10) if torch.equal(composites[2 + m, k], x[j])]
            assert match and all(int(y[j]) != int(y[i]) for j in match)


def test_channels_last_images_give_channels_last_composites():
    model = resnet(num_classes=4).eval()
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    GradCamConsistencyLoss(model, model.layer4, composites="shared")(x, torch.tensor([0, 1, 2, 3] * 2))
    handle.remove()
    assert seen[1].shape == (2, 3, 64, 64) and seen[1].is_contiguous(memory_format=torch.channels_last)


def test_shared_mode_is_seeded_by_the_loss_generator():
    model = resnet(num_classes=20).eval()
    x = torch.randn(12, 3, 32, 32)
    y = torch.randint(0, 20, (12,), generator=torch.Generator().manual_seed(3))
    outs = [
        GradCamConsistencyLoss(model, model.layer4, composites="shared",
                               generator=torch.Generator().manual_seed(s))(x, y)
        for s in (5, 5, 6)
    ]
    assert torch.equal(outs[0].groups, outs[1].groups) and torch.equal(outs[0].cells, outs[1].cells)
    assert outs[0].loss.item() == outs[1].loss.item()
    assert not torch.equal(outs[0].groups, outs[2].groups)


def test_ungrouped_distractors_need_batch_mates_or_are_given():
    model = resnet(num_classes=4).eval()
    shared = GradCamConsistencyLoss(model, model.layer4, composites="shared")
    x = torch.randn(3, 3, 32, 32)
    # Fewer than 4 images: nothing to group, and no image has three batch mates.
    with pytest.raises(ValueError, match=r"3 of the 3 images .* fewer than 3 batch mates"):
        shared(x, torch.tensor([0, 1, 2]))
    # All of one class: no group, no distractor in the batch.
    x8 = torch.randn(8, 3, 32, 32)
    with pytest.raises(ValueError, match=r"8 of the 8 images"):
        shared(x8, torch.zeros(8, dtype=torch.long))
    # Given distractors, every ungrouped image gets its per-image composite: exactly the
    # per-image mode (here no image is grouped at all).
    z = torch.randn(8, 3, 3, 32, 32)
    cells = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    y = torch.zeros(8, dtype=torch.long)
    out = shared(x8, y, z, cells=cells, groups=torch.zeros(0, 4, dtype=torch.long))
    ref = GradCamConsistencyLoss(model, model.layer4)(x8, y, z, cells=cells)
    assert out.num_ungrouped == 8
    torch.testing.assert_close(out.per_image_consistency, ref.per_image_consistency)
    torch.testing.assert_close(out.loss, ref.loss)
    # A callable is called only when some image is ungrouped.
    calls = []

    def lazy():
        calls.append(1)
        return z

    shared(x8, torch.arange(8) % 4, lazy)
    assert calls == []  # 8 images, 4 classes twice: two full composites
    shared(x8, y, lazy)
    assert calls == [1]


def test_multilabel_rows_without_a_class_and_the_engine_draw():
    model = resnet(num_classes=5).eval()
    g = torch.Generator().manual_seed(2)
    multi_hot = (torch.rand(12, 5, generator=g) < 0.3).float()
    multi_hot[:3] = 0  # images without annotations
    regularised = sample_positive_class(multi_hot, g)
    groups, cells = shared_composite_groups(multi_hot, regularised, generator=g)
    z = torch.randn(12, 3, 3, 32, 32)
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=1.0, criterion=ScaledBCEWithLogitsLoss(5.0),
                                     composites="shared")
    out = loss_fn(torch.randn(12, 3, 32, 32), multi_hot, z, cells=cells, gradcam_targets=regularised, groups=groups)
    assert out.num_ungrouped == 12 - groups.numel()
    assert math.isfinite(out.loss.item())
    assert torch.equal(out.cells, cells)


def test_shared_mode_double_backprop_reaches_the_head():
    # fc.weight enters the map only through dy/dA (second order): the consistency term alone
    # has a gradient there only if the copies' gradients were taken with create_graph=True.
    model = resnet(num_classes=8, gmp=True)
    x = torch.randn(8, 3, 64, 64)
    out = GradCamConsistencyLoss(model, model.layer4, composites="shared")(x, torch.arange(8))
    assert out.num_ungrouped == 0
    (g_fc,) = torch.autograd.grad(out.consistency, [model.fc.weight])
    assert g_fc.abs().sum() > 0


def test_shared_mode_under_bf16_autocast():
    model = resnet(num_classes=8)
    x = torch.randn(8, 3, 64, 64)
    y = torch.arange(8)
    loss_fn = GradCamConsistencyLoss(model, model.layer4, composites="shared",
                                     generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(x, y)
    assert out.composite_saliency.dtype == torch.float32  # maps in float32 under autocast
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    ref = GradCamConsistencyLoss(model, model.layer4, composites="shared",
                                 generator=torch.Generator().manual_seed(0))(x, y)
    torch.testing.assert_close(out.consistency, ref.consistency, rtol=0.1, atol=1e-3)


def test_a_layer_returning_a_tuple_is_refused_in_shared_mode():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x), x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            a, _ = self.pair(x)
            return self.fc(a.mean((2, 3)))

    net = Net()
    with pytest.raises(TypeError, match="must return a single tensor"):
        GradCamConsistencyLoss(net, net.pair, composites="shared")(torch.randn(4, 3, 16, 16), torch.arange(4))


def test_a_head_that_keeps_the_input_batch_size_is_named():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            n = x.shape[0]
            a = self.conv(x)
            return self.fc(a.mean((2, 3)))[:n]  # rows beyond the input's batch size dropped

    net = Fixed()
    with pytest.raises(RuntimeError, match="keep the batch size of the layer's output"):
        GradCamConsistencyLoss(net, net.conv, composites="shared")(torch.randn(4, 3, 16, 16), torch.arange(4))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(groups=torch.tensor([0, 1, 2, 3])), ValueError, r"groups must be a \(G, 4\) integer"),
        (dict(groups=torch.tensor([[0.0, 1, 2, 3]])), ValueError, r"groups must be a \(G, 4\) integer"),
        (dict(groups=torch.tensor([[0, 1, 2, 8]])), ValueError, r"positions in 0\.\.7"),
        (dict(groups=torch.tensor([[0, 1, 2, 3], [3, 4, 5, 6]])), ValueError, "more than once"),
        (dict(groups=torch.tensor([[0, 1, 2, 4]])), ValueError, r"contains that image's class 0"),
        (dict(cells=torch.zeros(8, dtype=torch.long)), ValueError, "cells come with the grouping"),
        (dict(groups=torch.tensor([[0, 1, 2, 3]]), cells=torch.zeros(8, dtype=torch.long)), ValueError,
         "their column in groups"),
        (dict(distractors=torch.randn(8, 2, 3, 32, 32)), ValueError, r"distractors must have shape"),
        (dict(distractors="batch"), TypeError, "callable"),
    ],
)
def test_shared_mode_bad_input(kwargs, error, match):
    model = resnet(num_classes=4).eval()
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    if "distractors" in kwargs:
        y = torch.zeros(8, dtype=torch.long)  # every image ungrouped: the distractors are read
    with pytest.raises(error, match=match):
        GradCamConsistencyLoss(model, model.layer4, composites="shared")(x, y, **kwargs)


def test_composites_argument():
    model = resnet(num_classes=4)
    with pytest.raises(ValueError, match="composites must be one of"):
        GradCamConsistencyLoss(model, model.layer4, composites="grouped")
    per_image = GradCamConsistencyLoss(model, model.layer4)
    assert per_image.composites == "per-image"
    with pytest.raises(ValueError, match="groups is for composites='shared'"):
        per_image(torch.randn(4, 3, 32, 32), torch.arange(4), torch.randn(4, 3, 3, 32, 32),
                  groups=torch.tensor([[0, 1, 2, 3]]))
