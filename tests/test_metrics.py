"""Tests of captum_consistency.metrics: hand-computed values, brute force, peers, properties."""

from __future__ import annotations

import math
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import captum_consistency.metrics._functional as functional
from captum_consistency import cell_mask, compose_grid
from captum_consistency.metrics import (
    InterpretationMetrics,
    boxes_to_mask,
    content_heatmap,
    negative_quadrants_heatmap,
    pointing_game,
    resize_saliency,
    stochastic_pointing_game,
)

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------------------------------------
# Reference implementations used by the tests (deliberately naive).
# ---------------------------------------------------------------------------------------------


def brute_force_within(masks: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(N, H, W) bool: pixels at Euclidean distance < tolerance of some mask pixel."""
    n, h, w = masks.shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).double()  # (HW, 2)
    out = torch.zeros(n, h * w, dtype=torch.bool)
    for i in range(n):
        pts = torch.nonzero(masks[i]).double()
        if len(pts):
            d2 = ((grid[:, None, :] - pts[None]) ** 2).sum(-1)
            out[i] = (d2 < tolerance**2).any(1)
    return out.view(n, h, w)


def random_masks(gen: torch.Generator, n: int, h: int, w: int, max_boxes: int = 3) -> torch.Tensor:
    """Unions of a few random boxes; never empty."""
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        for _ in range(int(torch.randint(1, max_boxes + 1, (1,), generator=gen))):
            y0 = int(torch.randint(0, h, (1,), generator=gen))
            x0 = int(torch.randint(0, w, (1,), generator=gen))
            bh = int(torch.randint(1, max(2, h // 3), (1,), generator=gen))
            bw = int(torch.randint(1, max(2, w // 3), (1,), generator=gen))
            masks[i, y0 : y0 + bh, x0 : x0 + bw] = True
    return masks


def peaked_maps(gen: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """Random non-negative maps with a few peaks (so PG and SPG are not trivial)."""
    return torch.rand(n, h, w, generator=gen) ** 6


# ---------------------------------------------------------------------------------------------
# Pointing game.
# ---------------------------------------------------------------------------------------------


def test_pointing_game_hand_computed_strict_boundary():
    saliency = torch.zeros(5, 60, 60)
    masks = torch.zeros(5, 60, 60, dtype=torch.bool)
    # Maximum at (row 20, col 20) for all; one mask pixel each at a chosen offset.
    saliency[:, 20, 20] = 1.0
    offsets = [(0, 15), (9, 12), (9, 11), (0, 14), (-10, -10)]  # d = 15, 15, 14.2, 14, 14.1
    for i, (dy, dx) in enumerate(offsets):
        masks[i, 20 + dy, 20 + dx] = True
    torch.testing.assert_close(pointing_game(saliency, masks), torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    # A fractional tolerance just above 15 admits the first two.
    torch.testing.assert_close(
        pointing_game(saliency, masks, tolerance=15.001), torch.ones(5)
    )
    # Tolerance 1: only the argmax pixel itself counts.
    masks[:, 20, 20] = True
    torch.testing.assert_close(pointing_game(saliency, masks, tolerance=1), torch.ones(5))


def test_pointing_game_accepts_channel_dim_and_integer_maps():
    saliency = torch.zeros(2, 1, 10, 10, dtype=torch.int64)
    saliency[0, 0, 2, 2] = 3
    saliency[1, 0, 8, 8] = 3
    masks = torch.zeros(2, 1, 10, 10, dtype=torch.bool)
    masks[:, :, :3, :3] = True
    torch.testing.assert_close(pointing_game(saliency, masks, tolerance=2), torch.tensor([1.0, 0.0]))


def test_pointing_game_ties_use_first_maximum_in_row_major_order():
    saliency = torch.zeros(1, 40, 40)
    saliency[0, 2, 30] = saliency[0, 30, 2] = 1.0  # (2, 30) comes first
    masks = torch.zeros(1, 40, 40, dtype=torch.bool)
    masks[0, 30, 2] = True
    assert pointing_game(saliency, masks, tolerance=5).item() == 0.0
    masks[0, 2, 30] = True
    assert pointing_game(saliency, masks, tolerance=5).item() == 1.0


@pytest.mark.parametrize("tolerance", [0.5, 1, 1.5, 2, 4.9, 7, 15, 22.3, 60])
def test_hit_test_equals_brute_force_at_every_pixel(tolerance):
    gen = torch.Generator().manual_seed(int(tolerance * 10))
    n, h, w = 6, 37, 45
    masks = random_masks(gen, n, h, w)
    masks[0] = False
    masks[0, 0, 0] = True  # a corner pixel: the disk leaves the image
    masks[1] = False
    masks[1, h - 1, w - 1] = True
    expected = brute_force_within(masks, tolerance)
    # The row-count index used by SPG (and by PG next to SPG).
    every_pixel = torch.arange(h * w).expand(n, -1)
    hits = functional._MaskIndex(masks, float(tolerance)).hits(every_pixel)
    assert torch.equal(hits.view(n, h, w), expected)
    # The direct disk read used by the pointing game alone: one point per (repeated) mask.
    direct = functional._disk_hits(
        masks.repeat_interleave(h * w, dim=0), torch.arange(h * w).repeat(n).unsqueeze(1), float(tolerance)
    )
    if tolerance < 30:
        assert torch.equal(direct.view(n, h, w), expected)
    else:  # the disk is larger than the direct read allows: the caller falls back to the index
        assert direct is None


def test_pointing_game_direct_and_indexed_paths_agree(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    saliency, masks = peaked_maps(gen, 40, 50, 60), random_masks(gen, 40, 50, 60)
    direct = pointing_game(saliency, masks, tolerance=9.5)
    monkeypatch.setattr(functional, "_MAX_DIRECT_DISK", 0)
    assert functional._disk_hits(masks, torch.zeros(40, 1, dtype=torch.long), 9.5) is None
    assert torch.equal(direct, pointing_game(saliency, masks, tolerance=9.5))
    assert 0 < int(direct.sum()) < 40


def test_pointing_game_matches_torchray():
    from torchray.benchmark.pointing_game import PointingGame

    gen = torch.Generator().manual_seed(0)
    n, h, w = 48, 64, 80
    saliency = peaked_maps(gen, n, h, w)
    masks = random_masks(gen, n, h, w)
    ours = pointing_game(saliency, masks, tolerance=15)
    game = PointingGame(num_classes=1, tolerance=15)
    flat = saliency.view(n, -1).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchRay's meshgrid without indexing=
        theirs = torch.tensor(
            [game.evaluate(masks[i], (int(flat[i] % w), int(flat[i] // w))) == 1 for i in range(n)]
        )
    assert 0 < int(theirs.sum()) < n  # both outcomes are exercised
    assert torch.equal(ours, theirs.float())


def test_pointing_game_tolerance_one_matches_quantus_pointing_game():
    import quantus  # a test dependency: a missing peer must fail, not skip
    gen = torch.Generator().manual_seed(1)
    n, h, w = 24, 20, 20
    saliency = peaked_maps(gen, n, h, w)
    masks = random_masks(gen, n, h, w)
    ours = pointing_game(saliency, masks, tolerance=1)  # only the maximum pixel itself
    metric = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True)
    theirs = metric(
        model=None,
        x_batch=np.zeros((n, 3, h, w), np.float32),
        y_batch=np.zeros(n, int),
        a_batch=saliency.unsqueeze(1).numpy(),
        s_batch=masks.unsqueeze(1).numpy().astype(np.float32),
        batch_size=n,
    )
    assert 0 < int(ours.sum()) < n
    np.testing.assert_array_equal(ours.numpy(), np.asarray(theirs, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Content heatmap and negative quadrants heatmap.
# ---------------------------------------------------------------------------------------------


def test_content_heatmap_hand_computed():
    saliency = torch.tensor([[[1.0, 3.0], [0.0, 4.0]], [[2.0, 2.0], [2.0, 2.0]]])
    masks = torch.tensor([[[True, False], [False, True]], [[True, True], [True, False]]])
    torch.testing.assert_close(content_heatmap(saliency, masks), torch.tensor([5 / 8, 3 / 4]))


def test_content_heatmap_matches_quantus_relevance_mass_accuracy():
    import quantus  # a test dependency: a missing peer must fail, not skip
    gen = torch.Generator().manual_seed(2)
    n, h, w = 16, 32, 28
    saliency = peaked_maps(gen, n, h, w)
    masks = random_masks(gen, n, h, w)
    metric = quantus.RelevanceMassAccuracy(normalise=False, abs=False, disable_warnings=True)
    theirs = metric(
        model=None,
        x_batch=np.zeros((n, 3, h, w), np.float32),
        y_batch=np.zeros(n, int),
        a_batch=saliency.unsqueeze(1).numpy(),
        s_batch=masks.unsqueeze(1).numpy().astype(np.float32),
        batch_size=n,
    )
    ours = content_heatmap(saliency, masks)
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), rtol=1e-5, atol=1e-6)


def test_negative_quadrants_heatmap_hand_computed():
    # Quadrant masses 1, 2, 3, 4 (cells 0..3) on a 4x4 composite.
    saliency = torch.zeros(4, 4, 4)
    for k, mass in enumerate([1.0, 2.0, 3.0, 4.0]):
        r, c = k // 2, k % 2
        saliency[:, 2 * r, 2 * c] = mass
    cells = torch.tensor([0, 1, 2, 3])
    expected = torch.tensor([9 / 10, 8 / 10, 7 / 10, 6 / 10])
    torch.testing.assert_close(negative_quadrants_heatmap(saliency, cells), expected)


def test_negative_quadrants_heatmap_follows_compose_grid_convention():
    gen = torch.Generator().manual_seed(3)
    n, h, w = 8, 12, 10
    inside = torch.rand(n, 1, h, w, generator=gen) + 0.1
    # A map supported on the positive cell only, placed by the composer itself: NQH is 0.
    composite, cells = compose_grid(inside, cells=None, generator=gen, return_cells=True)
    torch.testing.assert_close(negative_quadrants_heatmap(composite, cells), torch.zeros(n))
    # Any other cell sees all the mass outside.
    torch.testing.assert_close(negative_quadrants_heatmap(composite, (cells + 1) % 4), torch.ones(n))


@pytest.mark.parametrize("size", [(32, 32), (33, 35)])
def test_negative_quadrants_heatmap_matches_quantus_focus(size):
    import quantus  # a test dependency: a missing peer must fail, not skip
    gen = torch.Generator().manual_seed(4)
    n, (h, w) = 12, size
    saliency = torch.rand(n, h, w, generator=gen) ** 3
    cells = torch.randint(0, 4, (n,), generator=gen)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    metric = quantus.Focus(normalise=False, abs=False, disable_warnings=True)
    theirs = metric(
        model=model,
        x_batch=np.zeros((n, 3, h, w), np.float32),
        y_batch=np.zeros(n, int),
        a_batch=saliency.unsqueeze(1).numpy(),
        custom_batch=torch.nn.functional.one_hot(cells, 4).numpy(),  # p/N per quadrant
        batch_size=n,
    )
    ours = negative_quadrants_heatmap(saliency, cells)
    np.testing.assert_allclose(ours.numpy(), 1 - np.asarray(theirs), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Stochastic pointing game.
# ---------------------------------------------------------------------------------------------


def test_stochastic_pointing_game_converges_to_mass_within_tolerance():
    """SPG is a mean of num_samples Bernoulli(p) draws, p = mass within tolerance of the mask.

    Bound: |SPG - p| <= 5 * sqrt(p (1 - p) / S) + 1 / S (failure probability < 1e-6 per map).
    """
    gen = torch.Generator().manual_seed(5)
    n, h, w, s = 10, 40, 48, 20_000
    saliency = peaked_maps(gen, n, h, w)
    masks = random_masks(gen, n, h, w)
    tolerance = 6.5
    expected = (saliency * brute_force_within(masks, tolerance)).sum((1, 2)) / saliency.sum((1, 2))
    spg = stochastic_pointing_game(saliency, masks, tolerance, num_samples=s, generator=gen)
    bound = 5 * torch.sqrt(expected * (1 - expected) / s) + 1 / s
    assert ((spg - expected).abs() <= bound).all(), (spg, expected)
    torch.testing.assert_close(spg * s, torch.round(spg * s), atol=1e-3, rtol=0)  # k / S


def test_stochastic_pointing_game_is_reproducible_with_a_generator():
    gen = torch.Generator().manual_seed(6)
    saliency = torch.rand(4, 30, 30, generator=gen)
    masks = random_masks(gen, 4, 30, 30)
    a = stochastic_pointing_game(saliency, masks, generator=torch.Generator().manual_seed(1))
    b = stochastic_pointing_game(saliency, masks, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_stochastic_pointing_game_never_draws_zero_mass_pixels():
    # All mass on the object: every draw hits even with a tiny tolerance.
    saliency = torch.zeros(3, 50, 50)
    saliency[:, 10:20, 10:20] = torch.rand(3, 10, 10) + 0.01
    masks = saliency > 0
    spg = stochastic_pointing_game(saliency, masks, tolerance=0.5, num_samples=2000)
    torch.testing.assert_close(spg, torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Property-based tests (hypothesis).
# ---------------------------------------------------------------------------------------------


@st.composite
def maps_and_masks(draw, min_side=4, max_side=24):
    """Integer-valued non-negative maps (exact under scaling) and non-empty masks."""
    n = draw(st.integers(1, 4))
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    saliency = torch.randint(0, 1000, (n, h, w), generator=gen).float()
    saliency.view(n, -1)[:, 0] += 1  # never all zero
    density = draw(st.floats(0.01, 0.6))
    masks = torch.rand(n, h, w, generator=gen) < density
    masks.view(n, -1)[torch.arange(n), torch.randint(0, h * w, (n,), generator=gen)] = True
    return saliency, masks, seed


@SETTINGS
@given(data=maps_and_masks(), scale=st.floats(1e-3, 1e3), tolerance=st.floats(0.5, 20))
def test_property_pg_and_ch_invariant_to_positive_scaling(data, scale, tolerance):
    saliency, masks, _ = data
    assert torch.equal(
        pointing_game(saliency * scale, masks, tolerance), pointing_game(saliency, masks, tolerance)
    )
    torch.testing.assert_close(content_heatmap(saliency * scale, masks), content_heatmap(saliency, masks))


@SETTINGS
@given(data=maps_and_masks(), exponent=st.integers(-20, 20), tolerance=st.floats(0.5, 20))
def test_property_spg_invariant_to_positive_scaling(data, exponent, tolerance):
    saliency, masks, seed = data
    scale = 2.0**exponent  # exact in floating point, so the draws are identical
    a = stochastic_pointing_game(
        saliency * scale, masks, tolerance, 50, generator=torch.Generator().manual_seed(seed)
    )
    b = stochastic_pointing_game(saliency, masks, tolerance, 50, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)


@SETTINGS
@given(data=maps_and_masks())
def test_property_ch_is_one_inside_mask_and_complements_sum_to_one(data):
    saliency, masks, _ = data
    inside = saliency * masks
    nonzero = inside.flatten(1).sum(1) > 0
    torch.testing.assert_close(content_heatmap(inside, masks)[nonzero], torch.ones(int(nonzero.sum())))
    ch, ch_complement = content_heatmap(saliency, masks), content_heatmap(saliency, ~masks)
    full = masks.flatten(1).all(1)  # the complement is empty: NaN, degenerate
    assert torch.isnan(ch_complement[full]).all()
    torch.testing.assert_close((ch + ch_complement)[~full], torch.ones(int((~full).sum())))


@SETTINGS
@given(data=maps_and_masks(), cells_seed=st.integers(0, 1000))
def test_property_nqh_equals_one_minus_ch_of_cell_mask(data, cells_seed):
    saliency, _, _ = data
    n, h, w = saliency.shape
    cells = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(cells_seed))
    cell = cell_mask(cells, (h, w))
    torch.testing.assert_close(
        negative_quadrants_heatmap(saliency, cells), 1 - content_heatmap(saliency, cell)
    )


@SETTINGS
@given(data=maps_and_masks(), extra=st.floats(0.01, 10))
def test_property_pg_always_hits_beyond_the_diagonal(data, extra):
    saliency, masks, _ = data
    _, h, w = saliency.shape
    tolerance = math.hypot(h - 1, w - 1) + extra
    assert (pointing_game(saliency, masks, tolerance) == 1).all()
    assert (stochastic_pointing_game(saliency, masks, tolerance, 20) == 1).all()


@SETTINGS
@given(data=maps_and_masks(), tolerance=st.floats(0.5, 30))
def test_property_spg_of_one_hot_equals_pg(data, tolerance):
    saliency, masks, seed = data
    n, h, w = saliency.shape
    one_hot = torch.zeros_like(saliency).view(n, -1)
    one_hot[torch.arange(n), torch.randint(0, h * w, (n,), generator=torch.Generator().manual_seed(seed))] = 2.5
    one_hot = one_hot.view(n, h, w)
    assert torch.equal(
        stochastic_pointing_game(one_hot, masks, tolerance, 17), pointing_game(one_hot, masks, tolerance)
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=maps_and_masks(max_side=20), tolerance=st.floats(0.5, 8))
def test_property_spg_mean_converges_to_mass_within_tolerance(data, tolerance):
    """|SPG - p| <= 5 sqrt(p (1 - p) / S) + 1 / S, p the mass within tolerance of the mask."""
    saliency, masks, seed = data
    s = 4000
    within = brute_force_within(masks, tolerance)
    expected = (saliency * within).sum((1, 2)) / saliency.sum((1, 2))
    spg = stochastic_pointing_game(
        saliency, masks, tolerance, num_samples=s, generator=torch.Generator().manual_seed(seed)
    )
    bound = 5 * torch.sqrt(expected * (1 - expected) / s) + 1 / s
    assert ((spg - expected).abs() <= bound).all(), (spg, expected)


@SETTINGS
@given(data=maps_and_masks(max_side=16), tolerance=st.floats(0.5, 12))
def test_property_pg_equals_brute_force(data, tolerance):
    saliency, masks, _ = data
    n, h, w = saliency.shape
    within = brute_force_within(masks, tolerance).view(n, -1)
    expected = within.gather(1, saliency.view(n, -1).argmax(1, keepdim=True)).squeeze(1)
    assert torch.equal(pointing_game(saliency, masks, tolerance), expected.float())


# ---------------------------------------------------------------------------------------------
# Degenerate samples and bad input.
# ---------------------------------------------------------------------------------------------


def test_degenerate_samples_are_nan():
    saliency = torch.rand(3, 16, 16)
    saliency[1] = 0
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 4:8, 4:8] = masks[1, 4:8, 4:8] = True  # sample 2 has an empty mask
    for metric in (pointing_game, content_heatmap, stochastic_pointing_game):
        out = metric(saliency, masks)
        assert not torch.isnan(out[0]) and torch.isnan(out[1:]).all(), metric.__name__
    nqh = negative_quadrants_heatmap(saliency, torch.tensor([0, 1, 2]))
    assert not torch.isnan(nqh[[0, 2]]).any() and torch.isnan(nqh[1])


def test_maps_that_require_grad_are_scored_without_a_graph():
    saliency = torch.rand(3, 12, 12, requires_grad=True)
    masks = torch.rand(3, 12, 12) > 0.5
    for out in (
        pointing_game(saliency, masks),
        stochastic_pointing_game(saliency, masks),
        content_heatmap(saliency, masks),
        negative_quadrants_heatmap(saliency, torch.tensor([0, 1, 2])),
    ):
        assert not out.requires_grad
    torch.testing.assert_close(content_heatmap(saliency, masks), content_heatmap(saliency.detach(), masks))


def test_empty_batch():
    empty, masks = torch.zeros(0, 8, 8), torch.zeros(0, 8, 8, dtype=torch.bool)
    for metric in (pointing_game, content_heatmap, stochastic_pointing_game):
        assert metric(empty, masks).shape == (0,)
    assert negative_quadrants_heatmap(empty, torch.zeros(0, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, m: pointing_game(-s, m), "saliency must be non-negative"),
        (lambda s, m: content_heatmap(s.masked_fill(m, float("nan")), m), "saliency must not contain NaN"),
        (lambda s, m: stochastic_pointing_game(s.masked_fill(m, float("inf")), m), "saliency must be finite"),
        (lambda s, m: pointing_game(s, m[:, :-1]), "masks must have the saliency's shape"),
        (lambda s, m: content_heatmap(s, m.float()), "masks must be a boolean tensor"),
        (lambda s, m: pointing_game(s[0], m), r"saliency must have shape \(N, H, W\)"),
        (lambda s, m: content_heatmap(s[:, :0], m[:, :0]), r"with H, W >= 1"),
        (lambda s, m: pointing_game(s, m, tolerance=0), "tolerance must be a positive"),
        (lambda s, m: stochastic_pointing_game(s, m, num_samples=0), "num_samples must be a positive"),
        (lambda s, m: negative_quadrants_heatmap(s, torch.tensor([0, 4])), r"cells must lie in 0\.\.3"),
        (lambda s, m: negative_quadrants_heatmap(s, torch.tensor([-1, 0])), r"cells must lie in 0\.\.3"),
        (lambda s, m: negative_quadrants_heatmap(s, torch.tensor([0, 1, 2])), r"cells must have shape \(2,\)"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    saliency = torch.rand(2, 8, 8)
    masks = saliency > 0.5
    with pytest.raises(ValueError, match=match):
        call(saliency, masks)


def test_generator_of_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="generator"):
        stochastic_pointing_game(torch.rand(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), generator=3)


def test_results_do_not_depend_on_cpu_chunking(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    n, h, w = 20, 30, 30
    saliency = peaked_maps(gen, n, h, w)
    saliency[3] = 0
    masks = random_masks(gen, n, h, w)
    one_hot = torch.zeros(n, h * w)
    one_hot[torch.arange(n), torch.randint(0, h * w, (n,), generator=gen)] = 1
    one_hot = one_hot.view(n, h, w)
    def scores():
        return (
            pointing_game(saliency, masks),
            content_heatmap(saliency, masks),
            stochastic_pointing_game(one_hot, masks, num_samples=7),
            stochastic_pointing_game(saliency, masks, generator=torch.Generator().manual_seed(0)),
        )

    whole = scores()
    monkeypatch.setattr(functional, "CPU_CHUNK_ELEMENTS", h * w * 3)  # chunks of 3 samples
    chunked = scores()
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# boxes_to_mask and resize_saliency.
# ---------------------------------------------------------------------------------------------


def test_boxes_to_mask_inclusive_zero_based():
    mask = boxes_to_mask(torch.tensor([[1, 0, 2, 1]]), (3, 4))
    expected = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert boxes_to_mask(torch.tensor([[0, 0, 3, 2]]), (3, 4)).all()  # (0, 0, W-1, H-1)
    assert int(boxes_to_mask(torch.tensor([[2, 1, 2, 1]]), (3, 4)).sum()) == 1  # single pixel
    # Union of boxes; fractional corners keep the pixel indices inside the interval.
    union = boxes_to_mask(torch.tensor([[0.0, 0.0, 0.5, 0.5], [2.5, 1.2, 3.9, 2.0]]), (3, 4))
    expected = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)  # rows 1.2..2
    assert torch.equal(union, expected)


def test_boxes_to_mask_list_and_padded_forms_agree():
    boxes = [torch.tensor([[1, 1, 4, 3], [6, 0, 7, 7]]), torch.zeros(0, 4), torch.tensor([[0, 5, 9, 6]])]
    from_list = boxes_to_mask(boxes, (8, 10))
    padded = torch.full((3, 2, 4), float("nan"))
    padded[0] = boxes[0].float()
    padded[2, 0] = boxes[2].float()
    assert torch.equal(from_list, boxes_to_mask(padded, (8, 10)))
    for i, b in enumerate(boxes):
        expected = torch.zeros(8, 10, dtype=torch.bool)
        for x1, y1, x2, y2 in b.tolist():
            expected[int(y1) : int(y2) + 1, int(x1) : int(x2) + 1] = True
        assert torch.equal(from_list[i], expected)


def test_boxes_to_mask_one_based_matches_torchray_voc_as_mask():
    from torchray.benchmark.datasets import voc_as_mask

    objects = [
        {"name": "dog", "bndbox": {"xmin": "1", "ymin": "3", "xmax": "20", "ymax": "11"}},
        {"name": "dog", "bndbox": {"xmin": "15", "ymin": "9", "xmax": "32", "ymax": "24"}},
        {"name": "cat", "bndbox": {"xmin": "2", "ymin": "2", "xmax": "5", "ymax": "5"}},
    ]
    label = {"annotation": {"size": {"width": "32", "height": "24"}, "object": objects}}
    dog = 11  # VOC class index of "dog"
    theirs = voc_as_mask(label, dog)
    boxes = torch.tensor([[1, 3, 20, 11], [15, 9, 32, 24]])
    assert torch.equal(boxes_to_mask(boxes, (24, 32), one_based=True), theirs)


def test_boxes_to_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="boxes"):
        boxes_to_mask(torch.zeros(2, 3), (4, 4))
    with pytest.raises(ValueError, match="size"):
        boxes_to_mask(torch.zeros(2, 4), (4, 0))


def test_resize_saliency_is_bilinear_and_keeps_layout():
    gen = torch.Generator().manual_seed(8)
    cam = torch.rand(3, 1, 7, 9, generator=gen)
    out = resize_saliency(cam, (50, 40))
    expected = torch.nn.functional.interpolate(cam, size=(50, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)
    assert resize_saliency(cam[:, 0], (50, 40)).shape == (3, 50, 40)
    assert (out >= 0).all()
    per_image = resize_saliency(cam[:, 0], [(20, 30), (11, 13), (20, 30)])
    assert [tuple(m.shape) for m in per_image] == [(20, 30), (11, 13), (20, 30)]
    torch.testing.assert_close(
        per_image[1],
        torch.nn.functional.interpolate(cam[1:2], size=(11, 13), mode="bilinear", align_corners=False)[0, 0],
    )
    with pytest.raises(ValueError, match="size"):
        resize_saliency(cam, [(20, 30)])


# ---------------------------------------------------------------------------------------------
# InterpretationMetrics.
# ---------------------------------------------------------------------------------------------


def test_accumulator_pg_is_averaged_per_class():
    saliency = torch.zeros(4, 20, 20)
    saliency[:, 2, 2] = 1.0
    masks = torch.zeros(4, 20, 20, dtype=torch.bool)
    masks[[0, 1], 0:4, 0:4] = True  # hits
    masks[[2, 3], 18:20, 18:20] = True  # misses
    labels = torch.tensor([0, 0, 1, 2])  # class 0: 2/2, class 1: 0/1, class 2: 0/1
    metrics = InterpretationMetrics(num_classes=5, tolerance=3)
    metrics.update(saliency, masks, labels)
    out = metrics.compute()
    assert out["pg"] == pytest.approx(1 / 3)  # mean over the 3 classes present, not 2/4
    torch.testing.assert_close(
        out["pg_per_class"], torch.tensor([1.0, 0.0, 0.0, float("nan"), float("nan")], dtype=torch.float64),
        equal_nan=True,
    )
    assert out["num_images"] == 4 and out["skipped"] == 0
    assert math.isnan(out["nqh"]) and out["num_composites"] == 0


def test_accumulator_matches_functional_metrics_across_batches():
    gen = torch.Generator().manual_seed(9)
    n, h, w = 30, 32, 32
    saliency = peaked_maps(gen, n, h, w)
    saliency[5] = 0  # degenerate: all-zero map
    masks = random_masks(gen, n, h, w)
    masks[7] = False  # degenerate: empty mask
    labels = torch.randint(0, 4, (n,), generator=gen)
    composites = torch.rand(n, 2 * h, 2 * w, generator=gen)
    composites[0] = 0  # degenerate composite
    cells = torch.randint(0, 4, (n,), generator=gen)

    metrics = InterpretationMetrics(num_classes=4, generator=torch.Generator().manual_seed(0))
    for chunk in torch.arange(n).split(7):  # uneven batches
        metrics.update(saliency[chunk], masks[chunk], labels[chunk])
        metrics.update_nqh(composites[chunk], cells[chunk])
    out = metrics.compute()

    pg, ch = pointing_game(saliency, masks), content_heatmap(saliency, masks)
    valid = ~torch.isnan(pg)
    per_class = [pg[valid & (labels == c)].mean() for c in range(4) if (valid & (labels == c)).any()]
    assert out["pg"] == pytest.approx(float(torch.stack(per_class).mean()))
    assert out["ch"] == pytest.approx(float(ch.nanmean()))
    assert out["nqh"] == pytest.approx(float(negative_quadrants_heatmap(composites, cells).nanmean()))
    assert out["skipped_images"] == 2 and out["skipped_composites"] == 1 and out["skipped"] == 3
    assert out["num_images"] == n - 2 and out["num_composites"] == n - 1
    # SPG: 5 runs of per-image averages; mean and population std of the runs.
    expected = (saliency * brute_force_within(masks, 15)).sum((1, 2)) / saliency.sum((1, 2))
    mean_expected = float(expected.nanmean())
    # Each run averages 28 images x 100 draws: standard error <= 0.5 / sqrt(2800) < 0.01.
    assert abs(out["spg_mean"] - mean_expected) < 0.04
    assert 0 < out["spg_std"] < 0.04


def test_accumulator_spg_runs_mean_and_std():
    # Compared with a brute-force computation, not with the functions the accumulator calls:
    # each run's SPG is the per-image average of num_samples Bernoulli draws whose success
    # probability is the map's mass within the tolerance (brute_force_within). Over many runs
    # the runs' mean and population std approach the exact mean and std of that average.
    gen = torch.Generator().manual_seed(10)
    n, h, w, samples, runs = 12, 24, 24, 10, 400
    saliency = peaked_maps(gen, n, h, w)
    masks = random_masks(gen, n, h, w)
    tolerance = 3  # a margin that leaves mass outside: p well inside (0, 1)
    p = ((saliency * brute_force_within(masks, tolerance)).sum((1, 2)) / saliency.sum((1, 2))).double()
    exact_mean = float(p.mean())
    exact_std = float((p * (1 - p) / samples).sum().sqrt() / n)
    assert exact_std > 0.01  # maps with mass on both sides of the margin: a real spread
    metrics = InterpretationMetrics(tolerance=tolerance, num_samples=samples, num_runs=runs,
                                    generator=torch.Generator().manual_seed(3))
    metrics.update(saliency, masks)
    out = metrics.compute()
    assert abs(out["spg_mean"] - exact_mean) < 4 * exact_std / math.sqrt(runs)
    assert 0.85 * exact_std < out["spg_std"] < 1.15 * exact_std  # ~3.5 standard errors

    # Population std (ddof = 0) of the runs: with two runs, mean +- std are the runs
    # themselves, each an average of n * samples hits, i.e. a multiple of 1 / (n * samples).
    two = InterpretationMetrics(tolerance=tolerance, num_samples=samples, num_runs=2,
                                generator=torch.Generator().manual_seed(4))
    two.update(saliency, masks)
    out = two.compute()
    assert out["spg_std"] > 0
    for run in (out["spg_mean"] - out["spg_std"], out["spg_mean"] + out["spg_std"]):
        assert run * n * samples == pytest.approx(round(run * n * samples), abs=1e-3)  # float32 sums


def test_accumulator_spg_of_one_hot_maps_has_zero_std():
    saliency = torch.zeros(3, 30, 30)
    saliency[:, 5, 5] = 1
    masks = torch.zeros(3, 30, 30, dtype=torch.bool)
    masks[0, 5, 10] = masks[1, 25, 25] = masks[2, 5, 5] = True
    metrics = InterpretationMetrics()
    metrics.update(saliency, masks)
    out = metrics.compute()
    assert out["spg_mean"] == pytest.approx(2 / 3) and out["spg_std"] == 0.0
    assert out["pg"] == pytest.approx(2 / 3)


def test_accumulator_reset_and_validation():
    metrics = InterpretationMetrics(num_classes=2)
    saliency, masks = torch.rand(2, 8, 8), torch.ones(2, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="labels are required"):
        metrics.update(saliency, masks)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        metrics.update(saliency, masks, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="labels must be an integer"):
        metrics.update(saliency, masks, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="saliency must be non-negative"):
        metrics.update(-saliency, masks, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"cells must lie in 0\.\.3"):
        metrics.update_nqh(saliency, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="num_runs"):
        InterpretationMetrics(num_runs=0)
    metrics.update(saliency, masks, torch.tensor([0, 1]))
    assert metrics.compute()["num_images"] == 2
    metrics.reset()
    out = metrics.compute()
    assert out["num_images"] == 0 and math.isnan(out["pg"]) and math.isnan(out["spg_mean"])


# ---------------------------------------------------------------------------------------------
# Distributed: a 2-process gloo group on CPU.
# ---------------------------------------------------------------------------------------------


def _distributed_data(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    n, h, w = 6 + 3 * rank, 24, 24  # uneven shards
    saliency = peaked_maps(gen, n, h, w)
    saliency[0] = 0 if rank == 1 else saliency[0]
    masks = random_masks(gen, n, h, w)
    labels = torch.randint(0, 3, (n,), generator=gen)
    composites = torch.rand(n, 2 * h, 2 * w, generator=gen)
    cells = torch.randint(0, 4, (n,), generator=gen)
    return saliency, masks, labels, composites, cells


def _accumulate(metrics: InterpretationMetrics, rank: int) -> None:
    saliency, masks, labels, composites, cells = _distributed_data(rank)
    metrics.generator.manual_seed(1000 + rank)
    metrics.update(saliency, masks, labels)
    metrics.update_nqh(composites, cells)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import datetime

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        metrics = InterpretationMetrics(num_classes=3, generator=torch.Generator())
        _accumulate(metrics, rank)
        torch.save(metrics.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_accumulator_all_reduces_across_processes():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _distributed_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True
        )
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    single = InterpretationMetrics(num_classes=3, generator=torch.Generator())
    for rank in range(2):
        _accumulate(single, rank)  # the same data and draws in one process
    expected = single.compute()
    assert expected["num_images"] == 6 + 9 - 1 and expected["skipped"] == 1
    for result in results:
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(result[key], value, equal_nan=True)
            elif isinstance(value, int):
                assert result[key] == value, key
            else:
                assert result[key] == pytest.approx(value, rel=1e-12), key
