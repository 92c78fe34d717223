"""GradCamConsistencyLoss (Eq. 5) and to_global_max_pool."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from captum_consistency import GradCamConsistencyLoss, normalize_saliency, to_global_max_pool


def resnet(num_classes=6, gmp=False, seed=0):
    # A torchvision ResNet with one BasicBlock per stage: same structure as ResNet-18, half the cost.
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    return to_global_max_pool(model) if gmp else model


def batch(n=4, size=64, num_classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    z = torch.randn(n, 3, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y, z


def eq5_plain_torch(model, layer, x, y, z, cells, elementwise=True, detach_target=False):
    """The consistency term of Eq. 5 written with torch alone (no function of the library).

    A forward hook records the layer's output ``A``; ``torch.autograd.grad`` with
    ``create_graph=True`` gives ``dy/dA``; the map is ``relu(sum_k dy/dA_k * A_k)`` (Eq. 3) or,
    for standard Grad-CAM, ``relu(sum_k mean(dy/dA_k) * A_k)``, normalised as
    ``m / (m.sum() + 1e-8)``; the composite and the zero-padded target are built by slicing
    (cell k at row k // 2, column k % 2; distractors fill the other cells in increasing order).
    Maps that do not tile (AlexNet) are compared at pixel size after bilinear resizing.
    """
    n, c, s, _ = x.shape
    composite = x.new_zeros(n, c, 2 * s, 2 * s)
    for i in range(n):
        others = iter(z[i])
        for k in range(4):
            r, col = divmod(k, 2)
            composite[i, :, r * s:(r + 1) * s, col * s:(col + 1) * s] = x[i] if k == int(cells[i]) else next(others)
    acts = []
    handle = layer.register_forward_hook(lambda module, inputs, output: acts.append(output))
    try:
        logits_x, logits_c = model(x), model(composite)
    finally:
        handle.remove()

    def gradcam(logits, a):
        (g,) = torch.autograd.grad(logits[torch.arange(n), y].sum(), a, create_graph=True)
        weights = g if elementwise else g.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * a).sum(dim=1, keepdim=True))

    m_x, m_c = gradcam(logits_x, acts[0]), gradcam(logits_c, acts[1])
    if m_c.shape[-1] != 2 * m_x.shape[-1]:
        m_x = F.interpolate(m_x, size=(s, s), mode="bilinear", align_corners=False)
        m_c = F.interpolate(m_c, size=(2 * s, 2 * s), mode="bilinear", align_corners=False)
    g_x = m_x / (m_x.sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
    g_c = m_c / (m_c.sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
    if detach_target:
        g_x = g_x.detach()
    h, w = g_x.shape[-2:]
    target = torch.zeros_like(g_c)
    for i in range(n):
        r, col = divmod(int(cells[i]), 2)
        target[i, :, r * h:(r + 1) * h, col * w:(col + 1) * w] = g_x[i]
    return (g_c - target).abs().mean()


@pytest.mark.parametrize("gmp", [False, True])
def test_consistency_equals_the_hand_computed_eq5(gmp):
    model = resnet(gmp=gmp).eval()
    x, y, z = batch()
    cells = torch.tensor([0, 3, 1, 2])
    out = GradCamConsistencyLoss(model, model.layer4, lam=25.0)(x, y, z, cells=cells)
    expected = eq5_plain_torch(model, model.layer4, x, y, z, cells)
    torch.testing.assert_close(out.consistency, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.classification, F.cross_entropy(model(x), y))
    torch.testing.assert_close(out.loss, out.classification + 25.0 * out.consistency)
    assert torch.equal(out.cells, cells)
    assert out.saliency.shape == (4, 1, 2, 2) and out.composite_saliency.shape == (4, 1, 4, 4)
    # Double backpropagation: the same gradient, second-order terms (through dy/dA) included.
    params = [model.conv1.weight, model.layer4[0].conv2.weight, model.fc.weight]
    got = torch.autograd.grad(out.consistency, params)
    want = torch.autograd.grad(expected, params)
    for a, b in zip(got, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-9)


def test_standard_grad_cam_option_equals_the_hand_computed_grad_cam():
    model = resnet(gmp=True).eval()  # GMP so that Grad-CAM and element-wise Grad-CAM differ
    x, y, z = batch(seed=1)
    cells = torch.tensor([2, 2, 0, 1])
    out = GradCamConsistencyLoss(model, model.layer4, elementwise=False)(x, y, z, cells=cells)
    expected = eq5_plain_torch(model, model.layer4, x, y, z, cells, elementwise=False)
    torch.testing.assert_close(out.consistency, expected, rtol=1e-4, atol=1e-7)
    elementwise = GradCamConsistencyLoss(model, model.layer4)(x, y, z, cells=cells)
    assert not torch.allclose(elementwise.consistency, out.consistency)
    # The standard option's map is Captum's LayerGradCam (a peer), up to the normalisation.
    captum_map = LayerGradCam(model, model.layer4).attribute(x, target=y, relu_attributions=True)
    torch.testing.assert_close(out.saliency, captum_map / (captum_map.sum((1, 2, 3), keepdim=True) + 1e-8))


def test_lambda_zero_is_the_classification_loss():
    model = resnet()
    x, y, z = batch()
    out = GradCamConsistencyLoss(model, model.layer4, lam=0.0)(x, y, z)
    assert torch.equal(out.loss, out.classification)
    assert out.consistency.item() > 0  # still reported, for monitoring
    assert not out.consistency.requires_grad


def test_consistency_term_alone_reaches_backbone_and_head():
    model = resnet(gmp=True)
    x, y, z = batch()
    out = GradCamConsistencyLoss(model, model.layer4)(x, y, z)
    params = dict(model.named_parameters())
    names = ["conv1.weight", "layer1.0.conv1.weight", "layer4.0.bn2.weight", "fc.weight"]
    grads = torch.autograd.grad(out.consistency, [params[n] for n in names], allow_unused=True)
    for name, g in zip(names, grads):
        assert g is not None and g.abs().sum() > 0, name
    # fc.weight enters the map only through dy/dA: a second-order term. Detaching the gradient
    # (no double backprop) removes it.
    acts = {}
    h = model.layer4.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    logits = model(x)
    h.remove()
    grad = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), acts["a"])[0]  # no create_graph
    fake = normalize_saliency(F.relu((grad * acts["a"]).sum(1, keepdim=True))).sum()
    (g_fc,) = torch.autograd.grad(fake, [params["fc.weight"]], allow_unused=True)
    assert g_fc is None


def test_target_is_not_detached_by_default():
    # The loss's gradient equals that of the plain-torch Eq. 5 (create_graph=True on both
    # maps), with and without detaching the single image's map.
    model = resnet().eval()
    weight = model.layer4[0].conv2.weight
    differs = []
    for seed in range(3):
        x, y, z = batch(n=2, size=128, seed=seed)
        cells = torch.tensor([1, 2])
        grads = {}
        for detach in (False, True):
            out = GradCamConsistencyLoss(model, model.layer4, detach_target=detach)(x, y, z, cells=cells)
            manual = eq5_plain_torch(model, model.layer4, x, y, z, cells, detach_target=detach)
            (grads[detach],) = torch.autograd.grad(out.consistency, [weight])
            (expected,) = torch.autograd.grad(manual, [weight])
            torch.testing.assert_close(grads[detach], expected, rtol=1e-3, atol=1e-8)
        differs.append(not torch.allclose(grads[False], grads[True]))
    # Where the composite's map lies below the target over the whole cell, the L1 gradient is
    # constant there and vanishes through the target's sum-to-one normalisation; not always.
    assert any(differs)


def test_alexnet_maps_are_compared_at_pixel_resolution():
    torch.manual_seed(0)
    model = torchvision.models.alexnet(num_classes=5).eval()
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(2, 3, 224, 224)
    z = torch.randn(2, 3, 3, 224, 224)
    y = torch.tensor([1, 3])
    cells = torch.tensor([3, 0])
    out = GradCamConsistencyLoss(model, model.features)(x, y, z, cells=cells)
    assert out.saliency.shape == (2, 1, 224, 224)  # 6x6 and 13x13 do not tile: pixel size
    expected = eq5_plain_torch(model, model.features, x, y, z, cells)
    torch.testing.assert_close(out.consistency, expected, rtol=1e-4, atol=1e-9)


def test_all_zero_maps_give_a_finite_loss_and_gradients():
    model = resnet()
    model.layer4.register_forward_hook(lambda m, i, o: o * 0)  # dead layer: all maps are zero
    x, y, z = batch()
    out = GradCamConsistencyLoss(model, model.layer4)(x, y, z)
    assert math.isfinite(out.loss.item()) and out.consistency.item() == 0.0
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_multilabel_with_bce_and_gradcam_targets():
    model = resnet(num_classes=5)
    x, _, z = batch(n=3)
    multi_hot = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float)
    bce = nn.BCEWithLogitsLoss()
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=1.0, criterion=lambda o, t: 80 * bce(o, t))
    out = loss_fn(x, multi_hot, z, gradcam_targets=torch.tensor([2, 1, 4]))
    torch.testing.assert_close(out.classification, 80 * bce(out.logits, multi_hot))
    with pytest.raises(ValueError, match="gradcam_targets .* required"):
        loss_fn(x, multi_hot, z)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(images=torch.randn(4, 3, 64)), ValueError, "images must be"),
        (dict(targets=torch.tensor([0, 1])), ValueError, "targets must be"),
        (dict(distractors=torch.randn(4, 2, 3, 64, 64)), ValueError, "exactly 3"),
        (dict(distractors=torch.randn(4, 3, 3, 32, 32)), ValueError, "distractors must have shape"),
        (dict(cells=torch.tensor([0, 1, 2, 4])), ValueError, "cells must lie"),
        (dict(gradcam_targets=torch.tensor([0, 1, 2, 6])), ValueError, r"gradcam_targets must lie in 0\.\.5"),
        (dict(gradcam_targets=torch.tensor([0.0, 1, 2, 3])), ValueError, "gradcam_targets must be an integer"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, match):
    model = resnet()
    x, y, z = batch()
    args = dict(images=x, targets=y, distractors=z)
    args.update(change)
    with pytest.raises(error, match=match):
        GradCamConsistencyLoss(model, model.layer4)(**args)


def test_bad_construction():
    model = resnet()
    with pytest.raises(ValueError, match="not a submodule"):
        GradCamConsistencyLoss(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="lam"):
        GradCamConsistencyLoss(model, model.layer4, lam=-1.0)
    with pytest.raises(ValueError, match="lam"):
        GradCamConsistencyLoss(model, model.layer4, lam=float("nan"))
    loss_fn = GradCamConsistencyLoss(model, model.layer4)
    assert list(loss_fn.parameters()) == []  # the model is not re-registered


def test_to_global_max_pool_keeps_weights_and_rejects_alexnet():
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=4)
    model = to_global_max_pool(torchvision.models.resnet18(num_classes=4))
    assert isinstance(model.avgpool, nn.AdaptiveMaxPool2d)
    model.load_state_dict(source.state_dict())  # torchvision weights still load
    x = torch.randn(1, 3, 64, 64)
    feats = nn.Sequential(*list(source.children())[:-2])(x)
    torch.testing.assert_close(model(x), source.fc(feats.amax(dim=(2, 3))))
    with pytest.raises(ValueError, match="no global average pooling"):
        to_global_max_pool(torchvision.models.alexnet())
    with pytest.raises(TypeError):
        to_global_max_pool("resnet18")


# Issue 14: inputs that used to give silent wrong numbers or unhelpful errors.


def test_per_image_mode_requires_distractors():
    # Without distractors the composites' other cells used to be zeros, silently.
    model = resnet()
    x, y, _ = batch()
    loss_fn = GradCamConsistencyLoss(model, model.layer4)
    with pytest.raises(ValueError, match=r"distractors \(N, 3, C, H, W\) are required .* composites='shared'"):
        loss_fn(x, y, None)
    with pytest.raises(ValueError, match="are required"):
        loss_fn(x, y)


def test_lam_may_be_a_zero_dim_tensor():
    model = resnet().eval()
    x, y, z = batch()
    cells = torch.tensor([0, 3, 1, 2])
    ref = GradCamConsistencyLoss(model, model.layer4, lam=25.0)(x, y, z, cells=cells)
    for lam in (torch.tensor(25.0), torch.tensor(25), torch.tensor(25.0, dtype=torch.float64)):
        loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=lam)
        assert loss_fn.lam == 25.0 and type(loss_fn.lam) is float
        torch.testing.assert_close(loss_fn(x, y, z, cells=cells).loss, ref.loss)
    with pytest.raises(TypeError, match="0-d real tensor, got a tensor of shape \\(1,\\)"):
        GradCamConsistencyLoss(model, model.layer4, lam=torch.tensor([25.0]))
    with pytest.raises(TypeError, match="a float"):
        GradCamConsistencyLoss(model, model.layer4, lam="25")
    with pytest.raises(TypeError, match="a float"):
        GradCamConsistencyLoss(model, model.layer4, lam=True)
    with pytest.raises(ValueError, match="finite number >= 0"):
        GradCamConsistencyLoss(model, model.layer4, lam=torch.tensor(float("inf")))


@pytest.mark.parametrize("composites", ["per-image", "shared"])
def test_empty_batch_is_a_clear_error(composites):
    model = resnet()
    loss_fn = GradCamConsistencyLoss(model, model.layer4, composites=composites)
    with pytest.raises(ValueError, match=r"empty batch \(0 images\)"):
        loss_fn(torch.zeros(0, 3, 64, 64), torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, 3, 64, 64))


def test_bool_gradcam_targets_are_refused():
    # A boolean mask was read as classes 0 and 1.
    model = resnet(num_classes=5)
    x, y, z = batch()
    loss_fn = GradCamConsistencyLoss(model, model.layer4)
    with pytest.raises(ValueError, match="gradcam_targets must be an integer tensor .* torch.bool"):
        loss_fn(x, y, z, gradcam_targets=torch.tensor([True, False, True, False]))
    multi_hot = torch.zeros(4, 5)
    multi_hot[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1
    with pytest.raises(ValueError, match="gradcam_targets must be an integer tensor"):
        loss_fn(x, multi_hot, z, gradcam_targets=multi_hot[:, 0].bool())
