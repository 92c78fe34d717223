"""The explanation-guided losses: CGC, Energy, L1, PPCE, RRR and RRR on Grad-CAM.

Each is checked against a plain-torch reference written here from its paper's formula, with
gradcheck / gradgradcheck in float64 on a tiny model, for gradients below the attribution
layer, and for what it must survive (degenerate masks, a cut graph, a batch of one, bf16).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn

from captum_consistency.attr import DIFFERENTIABLE_ATTRIBUTIONS, differentiable_attribution
from captum_consistency.losses import (
    EXPLANATION_LOSSES,
    MASK_LOSSES,
    ContrastiveGradCamLoss,
    EnergyLoss,
    GradCamConsistencyLoss,
    L1MaskLoss,
    PPCELoss,
    RRRGradCamLoss,
    RRRLoss,
    cgc_infonce,
    crop_and_flip,
    energy_loss,
    l1_mask_loss,
    ppce_loss,
    random_crop_boxes,
    rrr_gradcam_loss,
    rrr_loss,
)

LAYER_ATTRIBUTIONS = ("gradcam", "elementwise-gradcam", "layer-gradient-x-activation")


class Tiny(nn.Module):
    """conv -> softplus -> conv (the attribution layer, `layer`) -> softplus -> GAP -> linear.

    Smooth activations, so that gradgradcheck is meaningful away from the maps' own ReLU.
    """

    def __init__(self, k=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, k)

    def forward(self, x):
        a = F.softplus(self.layer(F.softplus(self.conv1(x))))
        return self.fc(a.mean(dim=(2, 3)))


def masks_of(n=3, size=8):
    m = torch.zeros(n, size, size, dtype=torch.bool)
    m[0, 1:5, 2:6] = True
    m[1, 4:8, 0:3] = True
    if n > 2:
        m[2, 0:3, 0:8] = True
    return m


def data(n=3, size=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype), torch.tensor([0, 1, 2, 0, 1, 2][:n])


# ---------------------------------------------------------------- plain-torch references


def gradcam_plain(model, x, y, elementwise=False):
    acts = []
    h = model.layer.register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        logits = model(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(logits[torch.arange(len(y)), y].sum(), acts[0], create_graph=True)
    w = g if elementwise else g.mean(dim=(2, 3), keepdim=True)
    return logits, torch.relu((w * acts[0]).sum(1, keepdim=True))


def resize(a, size):
    return F.interpolate(a, size=size, mode="bilinear", align_corners=False)[:, 0]


def energy_plain(a, m):
    out = []
    for ai, mi in zip(a, m):
        pos = ai.clamp(min=0)
        inside, total = pos[mi].sum(), pos.sum()
        out.append(1 - inside if total < 1e-7 else 1 - inside / total)
    return torch.stack(out)


def l1_plain(a, m):
    out = []
    for ai, mi in zip(a, m):
        pos = ai.clamp(min=0)
        pos = pos / pos.abs().max() if pos.abs().max() > 0 else pos
        out.append((pos - mi.to(pos.dtype)).abs().mean())
    return torch.stack(out)


def ppce_plain(a, m):
    out = []
    for ai, mi in zip(a, m):
        pos = ai.clamp(min=0)
        pos = pos / pos.abs().max() if pos.abs().max() > 0 else pos
        vals = pos[mi]
        out.append(-(torch.log(vals.clamp_min(1e-12))).mean() if vals.numel() else pos.sum() * 0)
    return torch.stack(out)


def rrr_star_plain(a, m):
    out = []
    for ai, mi in zip(a, m):
        s = ai / ai.abs().max() if ai.abs().max() > 0 else ai
        out.append((s[~mi] ** 2).sum())
    return torch.stack(out)


def test_functionals_equal_their_formulas_on_fixed_tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)  # layer-size maps, signed
    m = masks_of(3, 8)
    up = resize(a, (8, 8))
    torch.testing.assert_close(energy_loss(a, m, reduction="none"), energy_plain(up, m))
    # L1/PPCE/RRR*: positive part and max-normalisation at the layer's size, then resize
    pos = a.clamp(min=0)
    pos = pos / pos.abs().amax(dim=(1, 2, 3), keepdim=True)
    up_pos = resize(pos, (8, 8))
    torch.testing.assert_close(l1_mask_loss(a, m, reduction="none"), torch.stack(
        [(u - mi.double()).abs().mean() for u, mi in zip(up_pos, m)]))
    torch.testing.assert_close(ppce_loss(a, m, reduction="none"), torch.stack(
        [-torch.log(u[mi].clamp_min(1e-12)).mean() for u, mi in zip(up_pos, m)]))
    signed = resize(a / a.abs().amax(dim=(1, 2, 3), keepdim=True), (8, 8))
    torch.testing.assert_close(rrr_gradcam_loss(a, m, reduction="none"), torch.stack(
        [(s[~mi] ** 2).sum() for s, mi in zip(signed, m)]))
    grads = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rrr_loss(grads, m, reduction="none"), torch.stack(
        [((gi * (~mi).double()) ** 2).sum() for gi, mi in zip(grads, m)]))
    # reductions
    torch.testing.assert_close(energy_loss(a, m), energy_plain(up, m).mean())
    torch.testing.assert_close(energy_loss(a, m, reduction="sum"), energy_plain(up, m).sum())
    # hand values: all attribution inside -> 0; none inside -> 1
    inside = torch.zeros(1, 1, 8, 8)
    inside[0, 0, 2, 3] = 5.0
    assert float(energy_loss(inside, m[:1])) == 0.0
    assert float(energy_loss(inside, ~m[:1])) == 1.0


def test_cgc_infonce_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    q, k = torch.rand(4, 10, generator=g, dtype=torch.float64), torch.rand(4, 10, generator=g, dtype=torch.float64)
    tau = 0.5
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    ref = []
    for i in range(4):
        pos = math.exp(float(qn[i] @ kn[i]) / tau)
        neg = sum(math.exp(float(qn[i] @ qn[j]) / tau) for j in range(4) if j != i)
        ref.append(-math.log(pos / (pos + neg)))
    torch.testing.assert_close(cgc_infonce(q, k, tau, reduction="none"), torch.tensor(ref, dtype=torch.float64))
    # negatives from a larger (gathered) set, each query at its own row
    extra = torch.rand(2, 10, generator=g, dtype=torch.float64)
    allq = torch.cat([extra, q])
    got = cgc_infonce(q, k, tau, negatives=allq, self_index=torch.arange(4) + 2, reduction="none")
    en = extra / extra.norm(dim=1, keepdim=True)
    for i in range(4):
        pos = math.exp(float(qn[i] @ kn[i]) / tau)
        neg = sum(math.exp(float(qn[i] @ qn[j]) / tau) for j in range(4) if j != i)
        neg += sum(math.exp(float(qn[i] @ e) / tau) for e in en)
        assert abs(float(got[i]) + math.log(pos / (pos + neg))) < 1e-10


def test_crop_and_flip_is_a_resized_crop_then_a_flip():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float64).view(2, 1, 8, 8)
    # full-image box: identity, and its mirror
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    out = crop_and_flip(x, boxes, torch.tensor([False, True]), (8, 8))
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], x[1].flip(-1))
    # a pixel-aligned crop resampled at its own size is the slice
    boxes = torch.tensor([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.5]])
    out = crop_and_flip(x, boxes, torch.tensor([False, True]), (4, 4))
    torch.testing.assert_close(out[0, 0], x[0, 0, 4:8, 2:6])
    torch.testing.assert_close(out[1, 0], x[1, 0, 0:4, 0:4].flip(-1))
    # a crop touching the top-left corner, upsampled x2: torch's bilinear resize of the slice
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2)
    out = crop_and_flip(x, boxes, torch.tensor([False, False]), (8, 8))
    ref = F.interpolate(x[:, :, 0:4, 0:4], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, :, :7, :7], ref[:, :, :7, :7])  # away from the crop's inner edge
    b, f = random_crop_boxes(100, generator=torch.Generator().manual_seed(0))
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    assert bool((b >= 0).all() and (b <= 1).all() and (area > 0.0).all() and (area <= 1.0).all())
    assert 20 < int(f.sum()) < 80


@pytest.mark.parametrize("cls,term,reference", [
    (EnergyLoss, energy_loss, energy_plain),
    (L1MaskLoss, l1_mask_loss, l1_plain),
    (PPCELoss, ppce_loss, ppce_plain),
    (RRRGradCamLoss, rrr_gradcam_loss, rrr_star_plain),
])
def test_mask_losses_equal_captum_gradcam_plus_the_formula(cls, term, reference):
    model = Tiny().double()
    x, y = data(dtype=torch.float64)
    m = masks_of()
    out = cls(model, model.layer, lam=2.0)(x, y, m)
    # the attribution from Captum's own LayerGradCam, the formula written above
    cam = LayerGradCam(model, model.layer).attribute(x, target=y, relu_attributions=True)
    logits = model(x)
    if cls is EnergyLoss:
        per = reference(resize(cam, (8, 8)), m)
    else:  # positive part / max normalisation at the layer's size, then resize
        pos = cam.clamp(min=0) if cls is not RRRGradCamLoss else cam
        peak = pos.abs().amax(dim=(1, 2, 3), keepdim=True)
        per = reference(resize(pos / peak, (8, 8)), m)
    torch.testing.assert_close(out.per_image, per.detach())
    ce = F.cross_entropy(logits, y)
    torch.testing.assert_close(out.loss.detach(), (ce + 2.0 * per.mean()).detach())
    assert out.num_skipped == 0 and out.saliency.shape == (3, 1, 8, 8)


def test_rrr_equals_ross_et_al():
    model = Tiny().double()
    x, y = data(dtype=torch.float64)
    m = masks_of()
    out = RRRLoss(model, lam=3.0)(x, y, m)
    xr = x.clone().requires_grad_()
    logits = model(xr)
    (g,) = torch.autograd.grad(F.log_softmax(logits, 1).sum(), xr)
    a = (~m).double()[:, None]  # the irrelevant region
    per = ((a * g) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_image, per)
    torch.testing.assert_close(out.loss.detach(), (F.cross_entropy(logits, y) + 3.0 * per.mean()).detach())


def test_cgc_equals_the_paper_with_official_choices():
    model = Tiny().double()
    x, y = data(n=4, dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4)  # whole-image crops: the view is the flip
    flips = torch.tensor([True, False, True, True])
    out = ContrastiveGradCamLoss(model, model.layer, lam=0.5, temperature=0.5)(x, y, boxes=boxes, flips=flips)
    views = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    logits = model(x)
    pred = logits.argmax(1)  # the official code regularises the predicted class

    def g(inp):
        _, cam = gradcam_plain(model, inp, pred, elementwise=True)
        cam = F.interpolate(cam, size=(8, 8), mode="bilinear", align_corners=False)
        return cam / (cam.sum(dim=(1, 2, 3), keepdim=True) + 1e-8) + 1e-8

    k = torch.where(flips.view(-1, 1, 1, 1), g(x).flip(-1), g(x)).flatten(1)
    q = g(views).flatten(1)
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    ref = []
    for i in range(4):
        pos = torch.exp(q[i] @ k[i] / 0.5)
        neg = sum(torch.exp(q[i] @ q[j] / 0.5) for j in range(4) if j != i)
        ref.append(-torch.log(pos / (pos + neg)))
    ref = torch.stack(ref)
    torch.testing.assert_close(out.per_image, ref.detach())
    torch.testing.assert_close(out.loss.detach(), (F.cross_entropy(logits, y) + 0.5 * ref.mean()).detach())
    torch.testing.assert_close(out.classes, pred)
    lab = ContrastiveGradCamLoss(model, model.layer, classes="label")(x, y, boxes=boxes, flips=flips)
    torch.testing.assert_close(lab.classes, y)


# ---------------------------------------------------------------- gradcheck / gradgradcheck


def _loss_of_weights(name, attribution=None):
    """The loss as a function of (conv1.weight, fc.weight): below and above the layer."""
    model = Tiny().double().eval()
    x, y = data(n=3, size=6, dtype=torch.float64)
    m = masks_of(3, 6)
    if name == "cgc":
        loss_fn = ContrastiveGradCamLoss(model, model.layer, attribution=attribution or "elementwise-gradcam")
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.9, 0.7], [0.3, 0.0, 1.0, 0.8]])
        flips = torch.tensor([True, False, True])
        call = lambda: loss_fn(x, y, boxes=boxes, flips=flips)  # noqa: E731
    else:
        kwargs = {} if name == "rrr" else {"attribution": attribution}
        loss_fn = EXPLANATION_LOSSES[name](model, model.layer, **kwargs)
        call = lambda: loss_fn(x, y, m)  # noqa: E731
    w1, w2 = model.conv1.weight.detach().clone(), model.fc.weight.detach().clone()

    def f(a, b):
        del model.conv1.weight, model.fc.weight
        model.conv1.weight, model.fc.weight = a, b  # plain tensors: gradcheck's inputs
        try:
            return call().loss
        finally:
            del model.conv1.weight, model.fc.weight
            model.conv1.weight, model.fc.weight = nn.Parameter(w1.clone()), nn.Parameter(w2.clone())

    return f, (w1.requires_grad_(), w2.requires_grad_())


@pytest.mark.parametrize("name,attribution", [
    ("cgc", None), ("energy", "gradcam"), ("energy", "input-x-gradient"), ("l1", "elementwise-gradcam"),
    ("ppce", "gradcam"), ("rrr", None), ("rrr-gradcam", "layer-gradient-x-activation"),
])
def test_gradcheck_and_gradgradcheck_float64(name, attribution):
    f, inputs = _loss_of_weights(name, attribution)
    # fast mode: random directional derivatives instead of the full Jacobians (same check,
    # a fraction of the cost with 123 inputs)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# ---------------------------------------------------------------- gradients below the layer


@pytest.mark.parametrize("name", sorted(set(EXPLANATION_LOSSES) - {"gc"}))
def test_the_term_has_nonzero_gradients_below_the_attribution_layer(name):
    model = Tiny()
    x, y = data(n=4)
    m = masks_of(4)
    loss_fn = EXPLANATION_LOSSES[name](model, model.layer, lam=1.0)
    out = loss_fn(x, y) if name == "cgc" else loss_fn(x, y, m)
    (g,) = torch.autograd.grad(out.explanation, model.conv1.weight)
    assert float(g.abs().sum()) > 0
    assert torch.isfinite(out.loss)


def test_gc_is_in_the_table_too():
    assert EXPLANATION_LOSSES["gc"] is GradCamConsistencyLoss
    assert set(MASK_LOSSES) == {"energy", "l1", "ppce", "rrr", "rrr-gradcam"}


# ---------------------------------------------------------------- what it must survive


def test_non_differentiable_attributions_are_refused_by_name():
    model = Tiny()
    for name in ("captum:occlusion", "pgc:scorecam", "cmwp", "fullgrad"):
        with pytest.raises(ValueError, match="not differentiable"):
            EnergyLoss(model, model.layer, attribution=name)
    with pytest.raises(ValueError, match="unknown attribution 'bogus'"):
        differentiable_attribution("bogus")
    assert set(DIFFERENTIABLE_ATTRIBUTIONS) == {"elementwise-gradcam", "gradcam", "input-x-gradient",
                                                "layer-gradient-x-activation"}


@pytest.mark.parametrize("name", sorted(MASK_LOSSES))
def test_masks_of_the_wrong_shape_are_named_errors(name):
    model = Tiny()
    loss_fn = EXPLANATION_LOSSES[name](model, model.layer)
    x, y = data()
    with pytest.raises(ValueError, match=r"masks are \(4, 4\) but the images are \(8, 8\)"):
        loss_fn(x, y, torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="one mask per image"):
        loss_fn(x, y, torch.ones(2, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize("name", sorted(MASK_LOSSES))
def test_all_false_and_all_true_masks_are_counted_skips_never_nan(name):
    model = Tiny()
    loss_fn = EXPLANATION_LOSSES[name](model, model.layer)
    x, y = data()
    m = masks_of()
    m[0] = False
    m[1] = True
    out = loss_fn(x, y, m)
    assert out.num_skipped == 2 and out.skipped.tolist() == [True, True, False]
    assert float(out.per_image[0]) == 0.0 and float(out.per_image[1]) == 0.0
    torch.testing.assert_close(out.explanation.detach(), out.per_image[2])
    every = loss_fn(x, y, torch.zeros(3, 8, 8, dtype=torch.bool))  # no object anywhere
    assert every.num_skipped == 3 and float(every.explanation.detach()) == 0.0
    for o in (out, every):
        assert torch.isfinite(o.loss)
        o.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()


class DetachedBackbone(Tiny):
    """A model whose attribution layer's input is cut from conv1 (a numpy round trip)."""

    def forward(self, x):
        h = F.softplus(self.conv1(x))
        h = torch.from_numpy(h.detach().numpy())
        a = F.softplus(self.layer(h))
        return self.fc(a.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", sorted(set(EXPLANATION_LOSSES) - {"gc", "rrr"}))
def test_a_graph_cut_below_the_layer_fails_the_first_step_naming_the_layer(name):
    model = DetachedBackbone()
    x, y = data(n=4)
    loss_fn = EXPLANATION_LOSSES[name](model, model.conv1 if name == "cgc" else model.layer)
    call = (lambda: loss_fn(x, y)) if name == "cgc" else (lambda: loss_fn(x, y, masks_of(4)))
    with pytest.raises(RuntimeError, match="layer 'conv1'" if name == "cgc" else "below layer 'layer'"):
        call()


def test_a_detaching_hook_on_the_layer_is_an_error_naming_it():
    model = Tiny()
    model.layer.register_forward_hook(lambda m, i, o: o.detach())
    x, y = data(n=4)
    for loss_fn in (EnergyLoss(model, model.layer), ContrastiveGradCamLoss(model, model.layer)):
        with pytest.raises(RuntimeError, match="layer 'layer'"):
            loss_fn(x, y, masks_of(4)) if loss_fn.needs_masks else loss_fn(x, y)


def test_cgc_with_a_batch_of_one_is_a_clear_error():
    model = Tiny()
    x, y = data(n=1)
    with pytest.raises(ValueError, match="at least 2 images per batch"):
        ContrastiveGradCamLoss(model, model.layer)(x, y)


@pytest.mark.parametrize("name", sorted(set(EXPLANATION_LOSSES) - {"gc"}))
def test_bf16_autocast_gives_finite_losses_and_gradients(name):
    model = Tiny()
    x, y = data(n=4)
    loss_fn = EXPLANATION_LOSSES[name](model, model.layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(x, y) if name == "cgc" else loss_fn(x, y, masks_of(4))
    assert torch.isfinite(out.loss) and out.explanation.dtype == torch.float32
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
