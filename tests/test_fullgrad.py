"""FullGrad: completeness, the authors' post-processing, and pytorch-grad-cam's variant."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import FullGrad as GradCamFullGrad
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from captum_consistency.attr import FullGrad


def _randomise_bn(model):
    for m in model.modules():  # a non-trivial implicit bias beta - mu gamma / sqrt(var + eps)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return _randomise_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


TARGET = [2, 5, 9]


def _reference_terms(model, x, target):
    """Gradients at every bias layer's output, with plain autograd on a copy without in-place
    ReLUs, and the implicit biases from the formula: the inputs of the authors' saliency."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    outputs = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            bias = m.bias.detach()
        elif isinstance(m, nn.BatchNorm2d):
            std = torch.sqrt(m.running_var + m.eps)
            bias = (m.bias - m.running_mean * m.weight / std).detach()
        else:
            continue
        m.register_forward_hook(lambda mod, i, o, name=name, bias=bias: outputs.__setitem__(name, (o, bias)))
    x = x.clone().requires_grad_(True)
    logits = model(x)
    selected = logits.gather(1, torch.tensor(target).view(-1, 1)).squeeze(1)
    names = list(outputs)
    grads = torch.autograd.grad(selected.sum(), [x] + [outputs[n][0] for n in names])
    terms = {}
    for n, g in zip(names, grads[1:]):
        b = outputs[n][1]
        terms[n] = g * b.view((1, -1) + (1,) * (g.dim() - 2))
    return selected.detach(), grads[0] * x.detach(), terms


def _authors_postprocess(t, eps=1e-6):
    # fullgrad-saliency's _postProcess: abs, subtract the per-image min, divide by the max + eps
    t = t.abs()
    t = t - t.flatten(1).min(1)[0].view(-1, 1, 1, 1)
    return t / (t.flatten(1).max(1)[0].view(-1, 1, 1, 1) + eps)


def test_completeness_resnet18_eval(resnet, images):
    dec = FullGrad(resnet).decompose(images, TARGET)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    assert set(dec.bias_terms) == {n for n, m in resnet.named_modules() if isinstance(m, nn.BatchNorm2d)} | {"fc"}
    assert len(dec.bias_terms) == n_bn + 1
    assert dec.bias_terms["fc"].shape == (3, 10)
    assert dec.bias_terms["layer4.1.bn2"].shape == (3, 512, 2, 2)
    with torch.no_grad():
        logits = resnet(images)
    torch.testing.assert_close(dec.output, logits[torch.arange(3), TARGET])
    torch.testing.assert_close(dec.total(), dec.output, rtol=1e-4, atol=1e-4 * dec.output.abs().max().item())
    # the bias terms matter: without them completeness fails badly
    assert (dec.input_term.flatten(1).sum(1) - dec.output).abs().max() > 1e-2


def test_matches_reference_from_formula(resnet, images):
    output, input_term, terms = _reference_terms(resnet, images, TARGET)
    dec = FullGrad(resnet).decompose(images, TARGET)
    torch.testing.assert_close(dec.input_term, input_term, rtol=1e-4, atol=1e-6)
    for name, term in terms.items():
        torch.testing.assert_close(dec.bias_terms[name], term, rtol=1e-4, atol=1e-6)
    # the saliency map, post-processed term by term as in the authors' code
    expected = _authors_postprocess(input_term).sum(1, keepdim=True)
    for term in terms.values():
        if term.dim() == 4:
            up = F.interpolate(_authors_postprocess(term), size=(64, 64), mode="bilinear", align_corners=True)
            expected = expected + up.sum(1, keepdim=True)
    sal, delta = FullGrad(resnet).attribute(images, TARGET, return_convergence_delta=True)
    assert sal.shape == (3, 1, 64, 64) and (sal >= 0).all()
    torch.testing.assert_close(sal, expected, rtol=1e-4, atol=1e-4 * expected.max().item())
    assert delta.abs().max() < 1e-4 * output.abs().max()


def test_differs_from_pytorch_grad_cam_only_by_post_processing(resnet, images):
    """pytorch-grad-cam rescales every channel separately (eps 1e-7), resizes with
    cv2 (half-pixel centres), and min-max normalises the result: rebuilt here from our
    decomposition, it equals pytorch-grad-cam's map; our map itself does not."""
    model = copy.deepcopy(resnet)
    theirs = GradCamFullGrad(model, [])(images, [ClassifierOutputTarget(t) for t in TARGET])
    theirs = torch.from_numpy(theirs)

    def per_channel(t, size):
        t = t.abs()
        lo = t.flatten(2).min(2)[0][..., None, None]
        t = t - lo
        t = t / (1e-7 + t.flatten(2).max(2)[0][..., None, None])
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    dec = FullGrad(resnet).decompose(images, TARGET)
    rebuilt = per_channel(dec.input_term, (64, 64)).sum(1)
    for term in dec.bias_terms.values():
        if term.dim() == 4:
            rebuilt = rebuilt + per_channel(term, (64, 64)).sum(1)
    rebuilt = rebuilt - rebuilt.flatten(1).min(1)[0][:, None, None]
    rebuilt = rebuilt / (1e-7 + rebuilt.flatten(1).max(1)[0][:, None, None])
    torch.testing.assert_close(rebuilt, theirs, rtol=1e-4, atol=1e-4)

    ours = FullGrad(resnet).attribute(images, TARGET)[:, 0]
    ours = (ours - ours.flatten(1).min(1)[0][:, None, None]) / ours.flatten(1).amax(1)[:, None, None]
    assert (ours - theirs).abs().mean() > 0.05  # ~0.3 on this model


class _SmallConvNet(nn.Module):
    """Conv biases, no batch norm, max pooling, two linear layers (VGG/AlexNet-like)."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), act(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), act()
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(64, 32), act(), nn.Linear(32, 4))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def test_completeness_without_batch_norm():
    torch.manual_seed(0)
    model = _SmallConvNet().eval()
    x = torch.randn(4, 3, 16, 16)
    dec = FullGrad(model).decompose(x, [0, 1, 2, 3])
    assert list(dec.bias_terms) == ["features.0", "features.3", "classifier.0", "classifier.2"]
    torch.testing.assert_close(dec.total(), dec.output, rtol=1e-4, atol=1e-5)
    sal = FullGrad(model).attribute(x, [0, 1, 2, 3])
    assert sal.shape == (4, 1, 16, 16) and (sal >= 0).all()


def test_completeness_failures_raise():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"completeness check failed.*features\.1 \(GELU\)"):
        FullGrad(_SmallConvNet(act=nn.GELU).eval()).attribute(x, 0)


def test_train_mode_batch_norm_refused_before_forward(resnet, images):
    model = copy.deepcopy(resnet).train()
    before = model.bn1.running_mean.clone()
    with pytest.raises(ValueError, match=r"batch norm in eval mode: 'bn1'.*model\.eval\(\)"):
        FullGrad(model).attribute(images, TARGET)
    torch.testing.assert_close(model.bn1.running_mean, before)  # no forward pass ran


def test_errors_and_state(resnet, images):
    flags = {n: p.requires_grad for n, p in resnet.named_parameters()}
    fullgrad = FullGrad(resnet)
    with pytest.raises(ValueError, match=r"target \[10\] outside the classifier's range \[0, 10\)"):
        fullgrad.attribute(images, [1, 2, 10])
    with pytest.raises(ValueError, match="N, C, H, W"):
        fullgrad.attribute(images[0], 1)
    with pytest.raises(TypeError, match="model"):
        FullGrad(lambda x: x)
    assert {n: p.requires_grad for n, p in resnet.named_parameters()} == flags
    assert all(len(m._forward_hooks) == 0 for m in resnet.modules())
    assert all(p.grad is None for p in resnet.parameters())
    # target None explains the predicted class
    with torch.no_grad():
        pred = resnet(images).argmax(1)
    torch.testing.assert_close(fullgrad.attribute(images), fullgrad.attribute(images, pred))
