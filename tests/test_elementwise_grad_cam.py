"""LayerElementwiseGradCam against Captum, pytorch-grad-cam and hand-computed values."""

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import LayerGradCam, LayerGradientXActivation
from pytorch_grad_cam import HiResCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from captum_consistency import to_global_max_pool
from captum_consistency.attr import LayerElementwiseGradCam


def small_convnet(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),  # smooth, so gradgradcheck is meaningful everywhere
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )
    return net.to(dtype)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval()


def test_equals_captum_gradient_x_activation_summed(resnet):
    x = torch.randn(3, 3, 64, 64)
    target = torch.tensor([0, 4, 6])
    ours = LayerElementwiseGradCam(resnet, resnet.layer3).attribute(x, target=target)
    gxa = LayerGradientXActivation(resnet, resnet.layer3).attribute(x, target=target)
    assert ours.shape == (3, 1, 4, 4)
    torch.testing.assert_close(ours, gxa.sum(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    relu = LayerElementwiseGradCam(resnet, resnet.layer3).attribute(
        x, target=target, relu_attributions=True
    )
    torch.testing.assert_close(relu, gxa.sum(dim=1, keepdim=True).clamp(min=0), rtol=1e-5, atol=1e-6)


def test_equals_captum_grad_cam_on_gap_resnet_layer4(resnet):
    # At layer4 of a GAP + linear head the gradient is w_tk / (hw) everywhere: no difference.
    x = torch.randn(2, 3, 96, 96)
    target = torch.tensor([1, 5])
    ours = LayerElementwiseGradCam(resnet, resnet.layer4).attribute(x, target=target)
    captum = LayerGradCam(resnet, resnet.layer4).attribute(x, target=target)
    torch.testing.assert_close(ours, captum, rtol=1e-4, atol=1e-6)


def test_differs_from_grad_cam_with_global_max_pooling():
    torch.manual_seed(1)
    model = to_global_max_pool(torchvision.models.resnet18(num_classes=5)).eval()
    x = torch.randn(2, 3, 96, 96)
    ours = LayerElementwiseGradCam(model, model.layer4).attribute(x, target=2)
    captum = LayerGradCam(model, model.layer4).attribute(x, target=2)
    assert not torch.allclose(ours, captum, rtol=1e-2, atol=1e-4)
    # With max pooling only the arg-max location of each channel has a gradient.
    acts = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    logits = model(x)
    handle.remove()
    a = acts["a"]
    grad = torch.autograd.grad(logits[:, 2].sum(), a)[0]
    nonzero_per_channel = (grad != 0).flatten(2).sum(-1)
    assert int(nonzero_per_channel.max()) <= 1
    torch.testing.assert_close(ours, (grad * a).sum(1, keepdim=True))


def test_matches_pytorch_grad_cam_hirescam_after_its_postprocessing(resnet):
    x = torch.randn(3, 3, 64, 64)
    classes = [2, 0, 5]
    ours = LayerElementwiseGradCam(resnet, resnet.layer3).attribute(
        x, target=torch.tensor(classes), relu_attributions=True
    )
    with HiResCAM(model=resnet, target_layers=[resnet.layer3]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    # pytorch-grad-cam: ReLU, per-image min-max, cv2 resize to the input, then min-max again.
    mine = scale_cam_image(ours[:, 0].detach().numpy(), target_size=(64, 64))
    mine = scale_cam_image(np.maximum(mine, 0), target_size=(64, 64))
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def test_hand_computed_linear_model():
    # y = sum(W * A) with A the layer output: dy/dA = W, so the map is sum_k W_k * A_k.
    layer = nn.Identity()
    weight = torch.randn(2, 3, 4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            a = self.layer(x)
            return torch.einsum("nkij,ckij->nc", a, weight)

    net = Net()
    x = torch.randn(5, 3, 4, 4)
    out = LayerElementwiseGradCam(net, net.layer).attribute(x, target=1)
    torch.testing.assert_close(out, (weight[1] * x).sum(1, keepdim=True))


def test_gradcheck_and_gradgradcheck_float64():
    net = small_convnet(torch.float64)
    cam = LayerElementwiseGradCam(net, net[2])
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)

    def fn(inp):
        return cam.attribute(inp, target=1, grad_kwargs={"create_graph": True})

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_create_graph_reaches_every_parameter():
    net = small_convnet()
    cam = LayerElementwiseGradCam(net, net[2])
    x = torch.randn(2, 2, 5, 5)
    out = cam.attribute(x, target=0, grad_kwargs={"create_graph": True})
    grads = torch.autograd.grad(out.pow(2).sum(), list(net.parameters()), allow_unused=True)
    names = [n for n, _ in net.named_parameters()]
    for name, g in zip(names, grads):
        if name == "5.bias":  # the logit's bias does not change dy/dA: no path, by design
            assert g is None
            continue
        assert g is not None and g.abs().sum() > 0, name
    # Without create_graph the gradient factor is a constant: the head's weight, which enters
    # the map only through dy/dA, gets no gradient (as in Captum's LayerGradCam).
    out = cam.attribute(x, target=0)
    (g_head,) = torch.autograd.grad(out.pow(2).sum(), [net[5].weight], allow_unused=True)
    assert g_head is None


def test_layer_not_in_model_is_rejected(resnet):
    other = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="layer .*not a submodule"):
        LayerElementwiseGradCam(resnet, other)
    with pytest.raises(TypeError, match="layer must be a torch.nn.Module"):
        LayerElementwiseGradCam(resnet, "layer4")


def _generic_path(model, layer, x, target):
    from captum._utils.gradient import compute_layer_gradients_and_eval

    grads, acts = compute_layer_gradients_and_eval(model, layer, (x,), target)
    return (grads[0] * acts[0]).sum(1, keepdim=True)


def test_cut_graph_path_equals_captum_generic_path_and_skips_the_backbone_graph():
    torch.manual_seed(0)
    # A model in training mode is attributed in eval mode (running statistics, left unchanged)
    # and given back in training mode.
    model = torchvision.models.resnet18(num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([1, 4])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ours = LayerElementwiseGradCam(model, model.layer3).attribute(x, target=target)
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    expected = _generic_path(model.eval(), model.layer3, x, target)
    model.train()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # The map of a plain attribution has no graph below the layer: no parameter gets a gradient.
    ours.sum().backward()
    assert all(p.grad is None for p in model.conv1.parameters())


def test_eval_model_on_cpu_runs_channels_last_with_the_values_of_the_nchw_generic_path():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(3, 3, 64, 64)
    seen = []
    model.conv1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    target = torch.tensor([0, 2, 4])
    ours = LayerElementwiseGradCam(model, model.layer4).attribute(x, target=target)
    assert seen == [True]  # the fast path converted the batch
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)  # caller's tensor untouched
    torch.testing.assert_close(ours, _generic_path(model, model.layer4, x, target), rtol=1e-4, atol=1e-6)
    assert ours.shape == (3, 1, 2, 2)


class _ViewHead(nn.Module):
    """A model whose head ``.view``s a conv output: that fails on channels-last activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        a = self.conv(x) * 1.0  # a new activation in the input's memory format
        return self.fc(a.view(a.shape[0], -1))


def test_model_that_needs_nchw_activations_still_gets_its_map():
    torch.manual_seed(0)
    net = _ViewHead().eval()
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match="view"):
        net(x.contiguous(memory_format=torch.channels_last))  # the failure the fast path survives
    ours = LayerElementwiseGradCam(net, net.conv).attribute(x, target=1)
    torch.testing.assert_close(ours, _generic_path(net, net.conv, x, 1))


def test_layer_output_modified_in_place_falls_back_to_the_generic_path():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    x = torch.randn(2, 3, 6, 6)
    ours = LayerElementwiseGradCam(net, net[0]).attribute(x, target=2)
    torch.testing.assert_close(ours, _generic_path(net, net[0], x, 2))


def test_negative_and_boolean_targets_are_refused(resnet):
    # Python indexing would explain the last class for -1 and the classes 1/0 for True/False.
    cam = LayerElementwiseGradCam(resnet, resnet.layer4)
    x = torch.randn(2, 3, 64, 64)
    for target in (-1, torch.tensor([0, -1]), [3, -7]):
        with pytest.raises(ValueError, match="class index|class indices"):
            cam.attribute(x, target=target)
    for target in (True, torch.tensor([True, False])):
        with pytest.raises(TypeError, match="bool"):
            cam.attribute(x, target=target)
    assert cam.attribute(x, target=[0, 6]).shape == (2, 1, 2, 2)


@pytest.mark.parametrize("create_graph", [False, True])
def test_empty_batch_gives_empty_maps_of_the_layer_resolution(resnet, create_graph):
    cam = LayerElementwiseGradCam(resnet, resnet.layer4)
    kwargs = dict(relu_attributions=True, grad_kwargs={"create_graph": create_graph})
    full = cam.attribute(torch.randn(1, 3, 96, 96), target=2, **kwargs)
    for target in (2, torch.zeros(0, dtype=torch.long), None):
        empty = cam.attribute(torch.randn(0, 3, 96, 96), target=target, **kwargs)
        assert empty.shape == (0,) + full.shape[1:] == (0, 1, 3, 3)
        assert empty.dtype == full.dtype
