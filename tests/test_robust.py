"""fgsm_accuracy: clean accuracy at epsilon 0, a hand-written FGSM, monotonicity on a toy model."""

import pytest
import torch
import torch.nn.functional as F
from captum.robust import FGSM
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_consistency.robust import IMAGENET_MEAN, IMAGENET_STD, fgsm_accuracy

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
EPSILONS = (0, 1, 2, 8, 16, 32, 64)


def _toy_data(n, seed):
    """Images in [0, 1] whose class (0-2) is the brightest colour channel, then normalised."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    pixels = 0.35 + 0.1 * torch.rand(n, 3, 8, 8, generator=g)
    pixels[torch.arange(n), labels] += 0.04 + 0.12 * torch.rand(n, 1, 1, generator=g)
    return (pixels.clamp(0, 1) - MEAN) / STD, labels


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.drop(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = _Toy()
    x, y = _toy_data(256, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def test_set():
    return _toy_data(96, seed=1)


def _reference(model, images, labels, epsilons):
    """FGSM written out: x' = clip(x + eps / (255 std) * sign(grad CE), (0 - mean) / std, (1 - mean) / std)."""
    x = images.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    sign = torch.where(grad.abs() > 1e-6, grad.sign(), torch.zeros_like(grad))  # Captum's zero_thresh
    out = {}
    with torch.no_grad():
        for eps in epsilons:
            adv = torch.clamp(images + eps / 255.0 / STD * sign, (0 - MEAN) / STD, (1 - MEAN) / STD)
            out[eps] = (model(adv).argmax(1) == labels).sum().item() / len(labels)
    return out


def test_epsilon_zero_is_clean_accuracy_and_matches_reference(trained, test_set):
    images, labels = test_set
    loader = DataLoader(TensorDataset(images, labels), batch_size=32)
    acc = fgsm_accuracy(trained, loader, epsilons=EPSILONS, progress=False)
    assert list(acc) == list(EPSILONS)
    with torch.no_grad():
        clean = (trained(images).argmax(1) == labels).float().mean().item()
    assert acc[0] == pytest.approx(clean, abs=1e-9)
    assert clean > 0.9  # the toy model is trained
    ref = _reference(trained, images, labels, EPSILONS)
    assert acc == pytest.approx(ref, abs=1e-9)


def test_accuracy_does_not_rise_with_epsilon(trained, test_set):
    images, labels = test_set
    batches = [(images[i : i + 40], labels[i : i + 40]) for i in range(0, 96, 40)]  # a plain list
    acc = fgsm_accuracy(trained, batches, epsilons=EPSILONS, progress=False)
    values = [acc[e] for e in EPSILONS]
    assert all(b <= a for a, b in zip(values, values[1:])), values
    assert values[-1] < values[0] - 0.3  # a strong attack does fool it


def test_same_images_as_captum_fgsm_per_epsilon(trained, test_set):
    """One gradient per batch gives the images of FGSM.perturb called once per epsilon."""
    images, labels = test_set
    lower, upper = (0 - MEAN) / STD, (1 - MEAN) / STD
    attack = FGSM(trained, loss_func=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    attack.bound = lambda x: torch.max(torch.min(x, upper), lower)  # per-channel bounds
    expected = {}
    for eps in (1, 16):
        adv = attack.perturb(images, epsilon=eps / 255.0 / STD, target=labels)
        with torch.no_grad():
            expected[eps] = (trained(adv).argmax(1) == labels).sum().item() / len(labels)
        # the attack moves every pixel by at most eps grey levels and stays in [0, 1]
        pixels = adv * STD + MEAN
        assert (pixels >= -1e-6).all() and (pixels <= 1 + 1e-6).all()
        assert ((adv - images) * STD).abs().max() <= eps / 255.0 + 1e-6
    acc = fgsm_accuracy(trained, [(images, labels)], epsilons=(1, 16), progress=False)
    assert acc == pytest.approx(expected, abs=1e-9)


def test_restores_mode_and_statistics(trained, test_set):
    images, labels = test_set
    trained.train()
    trained.bn.eval()
    before = trained.bn.running_mean.clone()
    try:
        a = fgsm_accuracy(trained, [(images, labels)], epsilons=(0, 8), progress=False)
        assert trained.training and not trained.bn.training and trained.drop.training
        torch.testing.assert_close(trained.bn.running_mean, before)
        b = fgsm_accuracy(trained, [(images, labels)], epsilons=(0, 8), progress=False)
        assert a == b  # dropout was off: deterministic
    finally:
        trained.eval()


def test_bad_arguments(trained, test_set):
    images, labels = test_set
    data = [(images, labels)]
    with pytest.raises(ValueError, match="non-negative"):
        fgsm_accuracy(trained, data, epsilons=(-1,), progress=False)
    with pytest.raises(ValueError, match="no samples"):
        fgsm_accuracy(trained, [], progress=False)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        fgsm_accuracy(trained, [(images[:, :1], labels)], progress=False)
    with pytest.raises(ValueError, match="same length"):
        fgsm_accuracy(trained, data, mean=(0.5,), progress=False)
    with pytest.raises(ValueError, match="std must be positive"):
        fgsm_accuracy(trained, data, std=(0.2, 0.0, 0.2), progress=False)
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        fgsm_accuracy(trained, [images], progress=False)
