"""The one-function-per-equation pieces: gc_consistency (Eq. 5), cell_rows_cols, the layer
recording primitive and the single layer check."""

import pytest
import torch
from torch import nn

import captum_consistency
from captum_consistency import GradCamConsistencyLoss, cell_mask, cell_rows_cols, compose_grid, gc_consistency
from captum_consistency.attr import LayerRecorder, elementwise_grad_cam, layer_gradients, score_gradients
from captum_consistency.attr._layers import check_layer_in_model, layer_name, resolve_layer
from captum_consistency.composition import distractor_cells, split_grid


class _Tiny(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_gc_consistency_is_the_hand_computed_l1_of_eq_5():
    map_x = torch.tensor([[[[1.0, 3.0], [0.0, 0.0]]]], dtype=torch.float64)
    map_c = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    map_c[0, 0, 0, 2] = 2.0  # all the composite's mass in cell 1, top-left pixel of the cell
    cells = torch.tensor([1])
    g_x = map_x / (4.0 + 1e-8)
    target = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    target[0, 0, :2, 2:] = g_x[0, 0]
    g_c = map_c / (2.0 + 1e-8)
    expected = (g_c - target).abs().mean()
    torch.testing.assert_close(gc_consistency(map_x, map_c, cells), expected)
    out = gc_consistency(map_x, map_c, cells, reduction="none", return_maps=True)
    torch.testing.assert_close(out.loss, expected.view(1))
    torch.testing.assert_close(out.saliency, g_x)
    torch.testing.assert_close(out.composite_saliency, g_c)


def test_gc_consistency_reductions_target_gradient_and_checks():
    torch.manual_seed(0)
    map_x = torch.rand(3, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    map_c = torch.rand(3, 1, 4, 6, dtype=torch.float64, requires_grad=True)
    cells = torch.tensor([0, 3, 2])
    per_image = gc_consistency(map_x, map_c, cells, reduction="none")
    assert per_image.shape == (3,)
    torch.testing.assert_close(gc_consistency(map_x, map_c, cells, reduction="sum"), per_image.sum())
    torch.testing.assert_close(gc_consistency(map_x, map_c, cells), per_image.mean())
    (grad,) = torch.autograd.grad(gc_consistency(map_x, map_c, cells), map_x)
    assert grad.abs().sum() > 0  # the target is not detached by default
    (grad,) = torch.autograd.grad(
        gc_consistency(map_x, map_c, cells, detach_target=True), map_x, allow_unused=True
    )
    assert grad is None
    with pytest.raises(ValueError, match="2h, 2w"):
        gc_consistency(map_x, map_c[..., :5], cells)
    with pytest.raises(ValueError, match="reduction"):
        gc_consistency(map_x, map_c, cells, reduction="max")
    with pytest.raises(ValueError, match="non-negative"):
        gc_consistency(-map_x, map_c, cells)


def test_the_loss_consistency_is_gc_consistency_of_its_maps():
    torch.manual_seed(0)
    model = _Tiny().double().eval()
    loss_fn = GradCamConsistencyLoss(model, model.features, lam=1.0, generator=torch.Generator().manual_seed(1))
    images = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    distractors = torch.rand(4, 3, 3, 6, 6, dtype=torch.float64)
    out = loss_fn(images, labels, distractors)
    composite = compose_grid(images, distractors, cells=out.cells)
    maps = []
    for x in (images, composite):
        rec = layer_gradients(lambda: model(x), model.features, classes=labels)
        maps.append(elementwise_grad_cam(rec.activations, rec.gradients))
    torch.testing.assert_close(out.consistency, gc_consistency(maps[0], maps[1], out.cells))


def test_one_cell_convention_for_the_composer_the_masks_and_the_distractors():
    cells = torch.arange(4)
    rows, cols = cell_rows_cols(cells)
    assert rows.tolist() == [0, 0, 1, 1] and cols.tolist() == [0, 1, 0, 1]
    x = torch.arange(4.0).view(4, 1, 1, 1) + 1
    grid = compose_grid(x, cells=cells)
    masks = cell_mask(cells, (2, 2))
    assert torch.equal(grid[:, 0] != 0, masks)
    assert torch.equal(split_grid(grid)[cells, cells], x)
    assert distractor_cells(cells).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_score_gradients_and_layer_gradients_match_autograd():
    torch.manual_seed(0)
    model = _Tiny().double()
    x = torch.rand(3, 3, 5, 5, dtype=torch.float64)
    classes = torch.tensor([4, 0, 2])
    with LayerRecorder(model.features) as rec:
        logits = model(x)
    acts = rec.pop()
    expected = torch.autograd.grad(logits[torch.arange(3), classes].sum(), acts, retain_graph=True)[0]
    (grads,) = score_gradients(logits, acts, classes, retain_graph=True)
    torch.testing.assert_close(grads, expected)
    (rows_grads,) = score_gradients(logits, acts, classes[:2], rows=torch.tensor([2, 0]), retain_graph=True)
    torch.testing.assert_close(rows_grads[1], torch.zeros_like(rows_grads[1]))
    for start_graph in (False, True):
        rec = layer_gradients(lambda: model(x), model.features, classes=classes, start_graph=start_graph)
        torch.testing.assert_close(rec.gradients, expected)
        torch.testing.assert_close(rec.activations, acts.detach())
    # create_graph: the gradient is differentiable with respect to the parameters
    rec = layer_gradients(lambda: model(x), model.features, classes=classes, create_graph=True)
    assert rec.gradients.requires_grad


def test_start_graph_keeps_no_graph_below_the_layer_and_tolerates_in_place_ops():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 16, 2))
    x = torch.rand(2, 3, 4, 4)

    def forward():
        with torch.no_grad():
            return net(x)[:, 1]

    rec = layer_gradients(forward, net[0], start_graph=True)
    assert rec.activations.is_leaf and (rec.activations < 0).any()  # before the in-place ReLU
    acts = net[0](x)
    expected = torch.autograd.grad(net[3](torch.relu(acts).flatten(1))[:, 1].sum(), acts)[0]
    torch.testing.assert_close(rec.gradients, expected)


def test_one_layer_check():
    model = _Tiny()
    assert resolve_layer(model, "features.0") is model.features[0]
    assert resolve_layer(model, model.fc) is model.fc
    assert layer_name(model, model.features[1]) == "features.1"
    stray = nn.Linear(2, 2)
    for call in (
        lambda: resolve_layer(model, stray),
        lambda: layer_name(model, stray),
        lambda: check_layer_in_model(model, stray),
        lambda: resolve_layer(model, "features.9"),
    ):
        with pytest.raises(ValueError, match="not a submodule"):
            call()
    with pytest.raises(TypeError, match="layer must be a torch.nn.Module"):
        check_layer_in_model(model, "fc")
    check_layer_in_model(lambda x: x, stray)  # a plain callable is not searched


def test_public_names_stay_importable():
    from captum_consistency.attr._excitation_backprop import resolve_layer as from_cmwp
    from captum_consistency.engine import ScaledBCEWithLogitsLoss
    from captum_consistency.engine.training import ScaledBCEWithLogitsLoss as from_training
    from captum_consistency.losses import LayerRecorder as from_losses
    from captum_consistency.losses import ScaledBCEWithLogitsLoss as from_losses_bce
    from captum_consistency.losses.functional import gc_consistency as functional

    assert from_cmwp is resolve_layer
    assert ScaledBCEWithLogitsLoss is from_training is from_losses_bce
    assert from_losses is LayerRecorder is captum_consistency.LayerRecorder
    assert functional is gc_consistency
