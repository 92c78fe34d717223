"""compose_grid / split_grid / cell_mask: properties (hypothesis) and bad inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_consistency import cell_mask, compose_grid, normalize_saliency, split_grid


@st.composite
def batches(draw):
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, 3))
    h = draw(st.integers(1, 6))
    w = draw(st.integers(1, 6))
    cells = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g)
    z = torch.rand(n, 3, c, h, w, generator=g)
    return x, z, torch.tensor(cells)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_every_cell_holds_the_right_image(batch):
    x, z, cells = batch
    n, c, h, w = x.shape
    grid = compose_grid(x, z, cells=cells)
    assert grid.shape == (n, c, 2 * h, 2 * w)
    for i in range(n):
        k = int(cells[i])
        others = [cell for cell in range(4) if cell != k]
        r, col = k // 2, k % 2
        assert torch.equal(grid[i, :, r * h : (r + 1) * h, col * w : (col + 1) * w], x[i])
        for j, cell in enumerate(others):  # distractors fill the remaining cells in order
            r, col = cell // 2, cell % 2
            assert torch.equal(grid[i, :, r * h : (r + 1) * h, col * w : (col + 1) * w], z[i, j])


@settings(max_examples=60, deadline=None)
@given(batches())
def test_split_inverts_compose(batch):
    x, z, cells = batch
    parts = split_grid(compose_grid(x, z, cells=cells))
    assert torch.equal(parts[torch.arange(len(cells)), cells], x)
    # recomposing the distractors in their cells gives back the grid
    slots = torch.stack([parts[i, [c for c in range(4) if c != int(cells[i])]] for i in range(len(cells))])
    assert torch.equal(slots, z)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_zero_padding_is_compose_with_no_distractors(batch):
    x, _, cells = batch
    padded = compose_grid(x, cells=cells)
    torch.testing.assert_close(padded.sum(dim=(2, 3)), x.sum(dim=(2, 3)))
    mask = cell_mask(cells, padded.shape[-2:])
    assert torch.equal(padded * mask.unsqueeze(1), padded)
    assert torch.equal(padded, compose_grid(x, torch.zeros(x.shape[0], 3, *x.shape[1:]), cells=cells))


def test_cell_convention_row_major():
    mask = cell_mask(torch.tensor([0, 1, 2, 3]), (2, 2))
    expected = torch.eye(4, dtype=torch.bool).view(4, 2, 2)
    assert torch.equal(mask, expected)


def test_random_cells_come_from_the_generator():
    x = torch.rand(64, 1, 2, 2)
    _, c1 = compose_grid(x, generator=torch.Generator().manual_seed(3), return_cells=True)
    _, c2 = compose_grid(x, generator=torch.Generator().manual_seed(3), return_cells=True)
    assert torch.equal(c1, c2)
    assert set(c1.tolist()) == {0, 1, 2, 3}


def test_gradient_flows_through_composition():
    x = torch.rand(2, 1, 3, 3, requires_grad=True)
    compose_grid(x, cells=torch.tensor([1, 3])).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_composition_is_differentiable_twice_in_every_source():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.rand(3, 3, 2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    cells = torch.tensor([2, 0, 3])
    weights = torch.rand(3, 2, 4, 6, generator=g, dtype=torch.float64)  # a non-uniform readout

    def f(x, z):
        return (compose_grid(x, z, cells=cells) * weights).square()

    assert torch.autograd.gradcheck(f, (x, z))
    assert torch.autograd.gradgradcheck(f, (x, z))
    assert torch.autograd.gradgradcheck(lambda x: compose_grid(x, cells=cells).square(), (x,))


@settings(max_examples=40, deadline=None)
@given(batches())
def test_channels_last_batch_gives_a_channels_last_grid_with_the_same_values(batch):
    x, z, cells = batch
    xc = x.contiguous(memory_format=torch.channels_last)
    grid = compose_grid(xc, z, cells=cells)
    assert torch.equal(grid, compose_grid(x, z, cells=cells))
    if not xc.is_contiguous():  # (with C = 1 or H = W = 1 both formats are one layout)
        assert grid.is_contiguous(memory_format=torch.channels_last) and not grid.is_contiguous()
    assert torch.equal(compose_grid(xc, cells=cells), compose_grid(x, cells=cells))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(positive=torch.rand(2, 3, 4)), ValueError, "positive"),
        (dict(distractors=torch.rand(2, 2, 3, 4, 4)), ValueError, "exactly 3"),
        (dict(distractors=torch.rand(2, 3, 3, 5, 4)), ValueError, "distractors must have shape"),
        (dict(distractors=torch.rand(3, 3, 3, 4, 4)), ValueError, "distractors must have shape"),
        (dict(cells=torch.tensor([0, 4])), ValueError, r"cells must lie in 0\.\.3"),
        (dict(cells=torch.tensor([-1, 0])), ValueError, r"cells must lie in 0\.\.3"),
        (dict(cells=torch.tensor([0])), ValueError, r"cells must have shape \(2,\)"),
        (dict(cells=torch.tensor([0.0, 1.0])), TypeError, "integer"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, match):
    args = dict(positive=torch.rand(2, 3, 4, 4), distractors=torch.rand(2, 3, 3, 4, 4))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        compose_grid(**args)


def test_normalize_never_nan_and_sums_to_one():
    m = torch.tensor([[[1.0, 3.0]], [[0.0, 0.0]]])
    out = normalize_saliency(m)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0].sum(), torch.tensor(1.0))
    assert torch.equal(out[1], torch.zeros(1, 2))
    z = torch.zeros(2, 1, 3, 3, requires_grad=True)
    normalize_saliency(z).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_normalize_refuses_signed_maps_and_names_the_minimum():
    # Captum's LayerGradCam without relu_attributions gives signed maps whose sum can be
    # near zero: the quotient would reach about 1e8 instead of a distribution.
    import torchvision
    from captum.attr import LayerGradCam

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    signed = LayerGradCam(model, model.layer4).attribute(torch.randn(2, 3, 64, 64), target=1).detach()
    assert float(signed.min()) < 0
    with pytest.raises(ValueError, match=rf"non-negative .*minimum of {float(signed.min()):.4g}"):
        normalize_saliency(signed)
    with pytest.raises(ValueError, match="minimum of -1"):
        normalize_saliency(torch.tensor([[1.0, -1.0]]))  # sum 0: the old result was +-1e8
    # NaN (a diverged step) propagates to the loss, where the training loop reports it.
    assert torch.isnan(normalize_saliency(torch.tensor([[1.0, float("nan")]]))).all()
    out = normalize_saliency(signed.clamp(min=0))  # the documented fix
    assert (out >= 0).all() and torch.allclose(out.sum((1, 2, 3)), torch.ones(2))
    # Non-negative by construction (after a ReLU): the check can be skipped, same values.
    relu = torch.relu(signed)
    assert torch.equal(normalize_saliency(relu, check=False), normalize_saliency(relu))
    assert normalize_saliency(torch.zeros(0, 1, 2, 2)).shape == (0, 1, 2, 2)
