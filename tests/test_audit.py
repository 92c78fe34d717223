"""The audit's measures (captum_consistency.metrics.ablation / faithfulness / randomization and
engine.audit_model): against brute-force loops in plain torch, a model whose answer is known
analytically, scipy's Spearman correlation, pytorch-grad-cam's ROAD, and the bad inputs."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from torch import nn

from captum_consistency.composition import compose_grid, split_grid
from captum_consistency.data import gather_distractors
from captum_consistency.engine import audit_model, gradcam_explainer
from captum_consistency.metrics import (
    cascading_randomization,
    cell_ablation_share,
    cell_replacement,
    deletion_curves,
    own_cell_removed,
    random_maps,
    road_score,
    spearman_correlation,
)
from captum_consistency.models import SmallResNet


def _bn_model(classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def _composites(n=6, size=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g),
            torch.randint(0, classes, (n,), generator=g))


def _brute_force_effects(model, x, targets, replacement, score):
    """The four cells of every composite replaced one at a time, image by image."""
    n, _, h, w = x.shape
    effects = torch.zeros(n, 4)
    with torch.no_grad():
        for i in range(n):
            def s(img):
                out = model(img)
                out = out.softmax(1) if score == "probability" else out
                return out[0, targets[i]]
            ref = s(x[i:i + 1])
            for k in range(4):
                r, c = k // 2, k % 2
                y = x[i:i + 1].clone()
                cell = (slice(None), slice(None), slice(r * h // 2, (r + 1) * h // 2),
                        slice(c * w // 2, (c + 1) * w // 2))
                y[cell] = replacement[i:i + 1][cell] if torch.is_tensor(replacement) else replacement
                effects[i, k] = ref - s(y)
    return effects


def _share(effects, cells):
    pos = effects.clamp(min=0)
    return (pos.sum(1) - pos[torch.arange(len(cells)), cells]) / pos.sum(1)


@pytest.mark.parametrize("baseline", ["zero", "mean", "blur", 0.5, "tensor"])
@pytest.mark.parametrize("score", ["logit", "probability"])
def test_cell_ablation_share_equals_a_brute_force_loop(baseline, score):
    model = _bn_model().eval()
    x, cells, targets = _composites()
    if baseline == "tensor":
        baseline = torch.randn_like(x)
    replacement = cell_replacement(x, baseline)
    expected = _brute_force_effects(model, x, targets, replacement, score)
    result = cell_ablation_share(model, x, cells, targets, baseline=baseline, score=score,
                                 batch_size=4)
    torch.testing.assert_close(result.effects, expected, atol=1e-5, rtol=1e-4)
    ok = ~result.undefined
    torch.testing.assert_close(result.share[ok], _share(expected, cells)[ok], atol=1e-5, rtol=1e-4)


def test_cell_replacement_by_hand():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    mean = cell_replacement(x, "mean")
    # cell 1 (top right) of image 0 holds 2, 3, 6, 7: mean 4.5 on its four pixels
    assert torch.equal(mean[0, 0, :2, 2:], torch.full((2, 2), 4.5))
    blur = split_grid(cell_replacement(x, "blur"))
    # a blurred cell keeps its own mean (reflect padding) and takes nothing from its neighbours
    cells = split_grid(x)
    assert torch.all(blur.amin(dim=(-1, -2)) >= cells.amin(dim=(-1, -2)) - 1e-5)
    assert torch.all(blur.amax(dim=(-1, -2)) <= cells.amax(dim=(-1, -2)) + 1e-5)
    assert cell_replacement(x, 0) == 0.0 and cell_replacement(x, "zero") == 0.0


class _LinearCam(nn.Module):
    """1x1 convolution, global average pool, linear: the logit is a sum of per-location terms,
    so a cell's effect (replaced by zeros: the convolution has no bias) is the sum of the
    pre-ReLU CAM ``sum_c W[t, c] A[c, i, j] / (H W)`` over the cell."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_cell_ablation_share_is_the_cam_share_on_a_linear_cam_model():
    torch.manual_seed(3)
    model = _LinearCam()
    x, cells, targets = _composites(n=8, size=8, classes=3, seed=1)
    with torch.no_grad():
        acts = model.conv(x)  # (N, 4, 8, 8)
        cam = torch.einsum("nc,nchw->nhw", model.fc.weight[targets], acts) / (8 * 8)
    by_cell = cam.view(8, 2, 4, 2, 4).sum(dim=(2, 4)).reshape(8, 4)  # cell k = 2 row + col
    result = cell_ablation_share(model, x, cells, targets)
    torch.testing.assert_close(result.effects, by_cell, atol=1e-5, rtol=1e-4)
    pos = by_cell.clamp(min=0)
    expected = 1 - pos[torch.arange(8), cells] / pos.sum(1)
    torch.testing.assert_close(result.share, expected, atol=1e-5, rtol=1e-4)


def test_model_mode_and_batch_norm_statistics_are_left_untouched():
    model = _bn_model().train()
    model[3].eval()  # a sub-module frozen in eval mode stays so
    x, cells, targets = _composites()
    before = copy.deepcopy(model.state_dict())
    a = cell_ablation_share(model, x, cells, targets)
    own_cell_removed(model, x, cells, targets)
    deletion_curves(model, x, torch.rand(6, 1, 4, 4), targets)
    assert model.training and not model[3].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model.eval()
    b = cell_ablation_share(model, x, cells, targets)
    torch.testing.assert_close(a.effects, b.effects)  # the train-mode call read eval statistics


class _Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros(x.shape[0], 3) + self.w


def test_zero_effects_are_undefined_and_counted_never_nan_in_the_mean():
    x, cells, targets = _composites(classes=3)
    result = cell_ablation_share(_Constant(), x, cells, targets)
    assert bool(result.undefined.all()) and torch.isnan(result.share).all()
    assert result.mean() is None
    # one defined composite among undefined ones: the mean is that composite's share
    model = _LinearCam()
    r = cell_ablation_share(model, x, cells, targets)
    assert r.mean() == pytest.approx(float(r.share[~r.undefined].double().mean()))


def test_bad_inputs_get_named_errors():
    model = _bn_model().eval()
    x, cells, targets = _composites()
    with pytest.raises(ValueError, match="even height and width"):
        cell_ablation_share(model, x[..., :15], cells, targets)
    with pytest.raises(ValueError, match="even height and width"):
        own_cell_removed(model, x[..., :15, :], cells, targets)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\]"):
        cell_ablation_share(model, x, cells, torch.full((6,), 5))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\]"):
        own_cell_removed(model, x, cells, torch.full((6,), -1))
    with pytest.raises(ValueError, match="single-label"):
        cell_ablation_share(model, x, cells, torch.zeros(6, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        cell_ablation_share(model, x, cells, torch.zeros(6))
    with pytest.raises(ValueError, match="cells"):
        cell_ablation_share(model, x, torch.full((6,), 4), targets)
    with pytest.raises(ValueError, match="unknown baseline"):
        cell_ablation_share(model, x, cells, targets, baseline="noise")
    with pytest.raises(ValueError, match="shaped like the composites"):
        cell_ablation_share(model, x, cells, targets, baseline=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="score"):
        cell_ablation_share(model, x, cells, targets, score="softmax")
    with pytest.raises(ValueError, match="batch_size"):
        cell_ablation_share(model, x, cells, targets, batch_size=0)
    with pytest.raises(TypeError, match="logits"):
        cell_ablation_share(lambda t: (t,), x, cells, targets)


def test_batch_size_changes_nothing():
    model = _bn_model().eval()
    x, cells, targets = _composites(n=7)
    a = cell_ablation_share(model, x, cells, targets)
    b = cell_ablation_share(model, x, cells, targets, batch_size=3)
    torch.testing.assert_close(a.effects, b.effects)
    c, d = own_cell_removed(model, x, cells, targets), own_cell_removed(model, x, cells, targets, batch_size=2)
    torch.testing.assert_close(c.probability, d.probability)


def test_own_cell_removed_by_hand():
    model = _bn_model().eval()
    x, cells, targets = _composites()
    result = own_cell_removed(model, x, cells, targets)
    with torch.no_grad():
        for i in range(6):
            r, c = int(cells[i]) // 2, int(cells[i]) % 2
            y = x[i:i + 1].clone()
            y[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0
            p = model(y).softmax(1)[0]
            assert result.probability[i].item() == pytest.approx(p[targets[i]].item(), abs=1e-6)
            assert bool(result.predicted[i]) == (int(p.argmax()) == int(targets[i]))
            assert result.probability_before[i].item() == pytest.approx(
                model(x[i:i + 1]).softmax(1)[0, targets[i]].item(), abs=1e-6)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 12), st.integers(0, 10_000), st.booleans())
def test_spearman_correlation_equals_scipy_with_ties(n, m, seed, ties):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, m, generator=g)
    b = torch.rand(n, m, generator=g)
    if ties:  # ReLU'd maps: many zeros
        a = (a - 0.5).clamp(min=0)
        b = (b * 3).floor()
    ours = spearman_correlation(a, b)
    for i in range(n):
        expected = spearmanr(a[i].numpy(), b[i].numpy()).statistic
        if np.isnan(expected):
            assert torch.isnan(ours[i])
        else:
            assert ours[i].item() == pytest.approx(expected, abs=1e-9)


def _small_resnet(seed=0):
    torch.manual_seed(seed)
    return SmallResNet(4, widths=(4, 8, 8, 8)).eval()


def test_randomization_correlation_is_one_untouched_and_falls_when_the_top_is_reset():
    model = _small_resnet()
    # give the head a clear preference so that the maps carry structure
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(16) % 4
    explain = gradcam_explainer(model, model.layer4)
    maps = explain(model, images, targets)
    same = spearman_correlation(maps, explain(copy.deepcopy(model), images, targets))
    valid = ~torch.isnan(same)
    assert valid.any() and torch.allclose(same[valid], torch.ones_like(same[valid]))
    state = copy.deepcopy(model.state_dict())
    steps = cascading_randomization(model, images, targets, explain, seed=1)
    assert [s.block for s in steps] == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert steps[1].mean() < 0.5  # fc and layer4 re-initialised: the map no longer survives
    for key, value in model.state_dict().items():  # the model itself is never changed
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="unknown blocks"):
        cascading_randomization(model, images, targets, explain, blocks=["layer9"])


def test_deletion_curves_equal_a_brute_force_loop_and_rank_a_true_map_first():
    torch.manual_seed(0)
    # the logit of class 0 is a weighted sum of the pixels: the weights are the true map
    weights = torch.rand(1, 1, 8, 8)

    class Weighted(nn.Module):
        def forward(self, x):
            s = (x * weights).sum(dim=(1, 2, 3))
            return torch.stack([s, torch.zeros_like(s)], dim=1)

    model = Weighted()
    images = torch.rand(3, 1, 8, 8) + 0.5
    targets = torch.zeros(3, dtype=torch.long)
    true = weights.expand(3, 1, 8, 8)
    curves = deletion_curves(model, images, true, targets, steps=4)
    order = weights.flatten().argsort(descending=True, stable=True)
    for s, frac in enumerate(curves.fractions.tolist()):
        k = round(frac * 64)
        for i in range(3):
            top, bottom = images[i].flatten().clone(), images[i].flatten().clone()
            top[order[:k]] = 0
            bottom[order[64 - k:]] = 0
            for got, img in ((curves.morf[i, s], top), (curves.lerf[i, s], bottom)):
                p = model(img.view(1, 1, 8, 8)).softmax(1)[0, 0]
                assert got.item() == pytest.approx(p.item(), abs=1e-6)
    reverse = deletion_curves(model, images, -true, targets, steps=4)
    assert bool((curves.area_between > 0).all()) and bool((reverse.area_between < 0).all())
    with pytest.raises(ValueError, match="steps"):
        deletion_curves(model, images, true, targets, steps=1)
    with pytest.raises(ValueError, match="maps"):
        deletion_curves(model, images, true[:2], targets)


def test_road_score_is_pytorch_grad_cams_road_combined():
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = _bn_model(classes=3).eval()
    images = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    maps = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([0, 1, 2])
    torch.manual_seed(5)  # ROAD's imputer adds noise from torch's global generator
    ours = road_score(model, images, maps, targets, percentiles=(30, 70))
    torch.manual_seed(5)
    cams = maps[:, 0].numpy()
    cams = (cams - cams.min(axis=(1, 2), keepdims=True)) / (
        cams.max(axis=(1, 2), keepdims=True) - cams.min(axis=(1, 2), keepdims=True))
    theirs = ROADCombined(percentiles=[30, 70])(images, cams, [ClassifierOutputSoftmaxTarget(t) for t in
                                                                 (0, 1, 2)], model)
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs).reshape(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="percentiles"):
        road_score(model, images, maps, targets, percentiles=(0, 50))


def test_random_maps_shape_and_seed():
    like = torch.zeros(2, 1, 4, 4)
    a = random_maps(like, torch.Generator().manual_seed(0))
    b = random_maps(like, torch.Generator().manual_seed(0))
    assert a.shape == like.shape and torch.equal(a, b) and float(a.min()) >= 0


def test_audit_model_keys_counts_and_mode():
    model = _small_resnet().train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 32, 32, generator=g)
    labels = torch.arange(12) % 4
    loader = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    gen = torch.Generator().manual_seed(1)

    def distractors(x, y, c):
        return gather_distractors(x, y, c, generator=gen)

    out = audit_model(model, loader, torch.device("cpu"), layer=model.layer4,
                      make_distractors=distractors, generator=gen, faithfulness_images=6,
                      road_images=2, randomization_images=5, progress=False)
    assert model.training  # restored
    assert out["num_composites"] == 12 and out["num_faithfulness_images"] == 6
    assert out["num_road_images"] == 2
    assert list(out["randomization"]) == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    for key in ("ablation_share", "ablation_share_blur", "own_cell_probability", "own_cell_predicted",
                "intact_probability"):
        assert out[key] is None or 0.0 <= out[key] <= 1.0, key
    assert 0 <= out["ablation_undefined"] <= 12
    limited = audit_model(model, loader, torch.device("cpu"), layer=model.layer4,
                          make_distractors=distractors, generator=gen, max_composites=5,
                          faithfulness_images=0, randomization_images=0, progress=False)
    assert limited["num_composites"] == 5 and limited["deletion_gradcam"] is None
    assert limited["randomization"] == {}
    # the composite cells really hold the images: the share is computed on compose_grid's grids
    grid = compose_grid(images[:4], distractors(images[:4], labels[:4], labels[:4]),
                        cells=torch.tensor([0, 1, 2, 3]))
    assert torch.equal(split_grid(grid)[torch.arange(4), torch.arange(4)], images[:4])
