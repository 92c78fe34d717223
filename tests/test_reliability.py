"""Inputs that used to give a silently wrong result or an error that did not name the problem
(issue 26): each now gives a named error, or works."""

import re

import pytest
import torch
from torch import nn

from captum_consistency import CaptumConsistencyWarning, GradCamConsistencyLoss, compose_grid
from captum_consistency.attr import LayerElementwiseGradCam, get_attribution
from captum_consistency.engine.cli import check_input_size
from captum_consistency.models import SmallResNet


def small(num_classes=4, seed=0):
    torch.manual_seed(seed)
    return SmallResNet(num_classes=num_classes, widths=(4, 8, 8, 8))


def batch(n=4, size=16, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    z = torch.randn(n, 3, 3, size, size, generator=g)
    y = torch.arange(n) % num_classes
    return x, y, z


# ------------------------------------------------------------------ silently wrong results

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_gc_loss_refuses_non_finite_pixels_on_the_cpu(value):
    model = small()
    x, y, z = batch()
    x[1, 0, 3, 3] = value
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        loss_fn(x, y, z)
    x[1, 0, 3, 3] = 0.0
    z[2, 1, 0, 0, 0] = value
    with pytest.raises(ValueError, match="non-finite"):
        loss_fn(x, y, z)


def test_training_stops_with_a_named_error_at_the_first_non_finite_step():
    # The accelerator path does not check the pixels (a host-device sync per step): the loss
    # propagates NaN and train_one_epoch stops with FloatingPointError naming the step, even
    # between two logged steps. Simulated on the CPU with a loss that does not check.
    from torch.utils.data import DataLoader, TensorDataset

    from captum_consistency.engine import train_one_epoch

    model = small()
    x, y, _ = batch(n=12)
    x[4:8] = float("nan")  # the second of three batches; nothing logged before the end
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(FloatingPointError, match="first non-finite loss at step 2, detected at step 3"):
        train_one_epoch(model, optimizer, loader, "cpu", 0, criterion=nn.CrossEntropyLoss(),
                        log_every=1000, progress=False, num_classes=4)


def test_gc_loss_bounds_lambda_to_float32():
    model = small()
    with pytest.raises(ValueError, match="float32"):
        GradCamConsistencyLoss(model, model.layer4, lam=1e39)


def test_elementwise_gradcam_zeroes_a_non_finite_map_with_a_warning():
    model = small().eval()
    x, y, _ = batch()
    x[2, 0, 5, 5] = float("nan")
    with pytest.warns(CaptumConsistencyWarning, match="1 of 4 maps are not finite"):
        maps = LayerElementwiseGradCam(model, model.layer4).attribute(x, target=y, relu_attributions=True)
    assert torch.isfinite(maps).all()
    assert maps[2].abs().sum() == 0 and maps[0].abs().sum() > 0


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("how", ["registry", "class"])
def test_attribution_in_train_mode_changes_no_buffer_and_no_batch_mate(how):
    model = small().train()
    x, y, _ = batch()
    before = _buffers(model)
    if how == "registry":
        attr = get_attribution("elementwise-gradcam", model).attribute
        alone, full = attr(x[:1], y[:1]), attr(x, y)
    else:
        cam = LayerElementwiseGradCam(model, model.layer4)
        alone, full = cam.attribute(x[:1], target=y[:1]), cam.attribute(x, target=y)
    assert model.training  # the mode is restored
    for k, v in _buffers(model).items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(alone[0], full[0], rtol=1e-4, atol=1e-6)


def test_gc_loss_keeps_batch_statistics_in_training():
    # The loss itself computes Grad-CAM in training mode, as in the paper: its buffers move.
    model = small().train()
    x, y, z = batch()
    before = _buffers(model)
    GradCamConsistencyLoss(model, model.layer4, lam=1.0)(x, y, z).loss.backward()
    assert not torch.equal(before["bn1.running_mean"], model.bn1.running_mean)


def test_compose_grid_refuses_mixed_devices():
    x = torch.randn(2, 3, 4, 4)
    z = torch.empty(2, 3, 3, 4, 4, device="meta")
    with pytest.raises(ValueError, match="device"):
        compose_grid(x, z)


def test_check_input_size_names_the_smallest_size_for_gc():
    with pytest.raises(ValueError, match=r"at least 2x2.*at least (\d+)") as exc:
        check_input_size("resnet18", 40, 4, gc=True)
    least = int(re.search(r"at least (\d+) pixels", str(exc.value)).group(1))
    check_input_size("resnet18", least, 4, gc=True)
    with pytest.raises(ValueError, match="at least 2x2"):
        check_input_size("resnet18", least - 1, 4, gc=True)
    assert check_input_size("resnet18", 40, 4) == 1  # without GC the size trains


# ------------------------------------------------------------------ obscure errors

def test_frozen_backbone_trains_its_head_with_the_gc_loss():
    model = small()
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=10.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    head = model.fc.weight.detach().clone()
    frozen = model.conv1.weight.detach().clone()
    x, y, z = batch()
    for _ in range(2):
        out = loss_fn(x, y, z)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert not torch.equal(model.fc.weight, head)
    assert torch.equal(model.conv1.weight, frozen)
    # the consistency term itself reaches the head
    (g,) = torch.autograd.grad(loss_fn(x, y, z, cells=torch.zeros(4, dtype=torch.long)).consistency,
                               model.fc.weight)
    assert g.abs().sum() > 0


def test_gc_loss_with_every_parameter_frozen_is_a_clear_error():
    model = small().requires_grad_(False)
    x, y, z = batch()
    with pytest.raises(ValueError, match="frozen"):
        GradCamConsistencyLoss(model, model.layer4, lam=1.0)(x, y, z)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_gc_loss_under_no_grad_names_the_cause(context):
    model = small()
    x, y, z = batch()
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=1.0)
    with context(), pytest.raises(RuntimeError, match="no_grad|inference_mode"):
        loss_fn(x, y, z)


def test_attribution_under_inference_mode_names_the_cause():
    model = small().eval()
    x, y, _ = batch()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        get_attribution("elementwise-gradcam", model).attribute(x, y)
    with torch.no_grad():  # works: the attribution turns gradients on
        assert get_attribution("elementwise-gradcam", model).attribute(x, y).shape == (4, 1, 16, 16)


def test_gc_loss_refuses_a_compiled_model_and_says_what_to_do():
    model = small()
    with pytest.raises(TypeError, match="torch.compile.*compile"):
        GradCamConsistencyLoss(torch.compile(model), model.layer4)
    other = small()
    other.compile()
    with pytest.raises(TypeError, match="torch.compile"):
        GradCamConsistencyLoss(other, other.layer4)


class _TupleOut(nn.Module):
    def __init__(self, model, as_dict=False):
        super().__init__()
        self.model, self.as_dict = model, as_dict

    def forward(self, x):
        logits = self.model(x)
        return {"logits": logits} if self.as_dict else (logits, x.mean())


@pytest.mark.parametrize("as_dict", [False, True])
def test_model_returning_a_tuple_or_dict_is_named(as_dict):
    inner = small()
    model = _TupleOut(inner, as_dict)
    x, y, z = batch()
    kind = "dict" if as_dict else "tuple"
    with pytest.raises(TypeError, match=f"returned a {kind}"):
        GradCamConsistencyLoss(model, inner.layer4, lam=1.0)(x, y, z)
    with pytest.raises(TypeError, match=f"returned a {kind}"):
        get_attribution("elementwise-gradcam", model.eval(), layer=inner.layer4).attribute(x, y)


def test_gc_loss_output_transform_picks_the_logits():
    inner = small()
    model = _TupleOut(inner, as_dict=True)
    x, y, z = batch()
    cells = torch.tensor([0, 1, 2, 3])
    picked = GradCamConsistencyLoss(model, inner.layer4, lam=1.0, output_transform=lambda o: o["logits"])
    plain = GradCamConsistencyLoss(inner, inner.layer4, lam=1.0)
    torch.testing.assert_close(picked(x, y, z, cells=cells).loss, plain(x, y, z, cells=cells).loss)


def test_final_linear_as_layer_is_named():
    model = small()
    x, y, z = batch()
    with pytest.raises(ValueError, match=r"spatial \(N, C, H, W\)"):
        GradCamConsistencyLoss(model, model.fc, lam=1.0)(x, y, z)
    for name in ("elementwise-gradcam", "gradcam"):
        with pytest.raises(ValueError, match=r"spatial\s+\(N, C, H, W\)"):
            get_attribution(name, model.eval(), layer="fc").attribute(x, y)


def test_whole_model_as_layer_is_named():
    model = small()
    x, y, z = batch()
    with pytest.raises(ValueError, match=r"spatial.*\(N, C, H, W\)"):
        GradCamConsistencyLoss(model, model, lam=1.0)(x, y, z)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_are_named(dtype):
    model = small()
    x, y, z = batch()
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=1.0)
    with pytest.raises(TypeError, match="floating"):
        loss_fn(x.to(dtype), y, z.to(dtype))
    with pytest.raises(TypeError, match="floating"):
        get_attribution("elementwise-gradcam", model.eval()).attribute(x.to(dtype), y)


def test_float_targets_for_cross_entropy_are_named():
    model = small()
    x, y, z = batch()
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=1.0)
    with pytest.raises(ValueError, match="gradcam_targets"):
        loss_fn(x, y.float(), z)
