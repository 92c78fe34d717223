"""Robustness to FGSM (Table 6 of Pillai & Pirsiavash, AAAI 2021), on top of ``captum.robust``."""

from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from captum.robust import FGSM
from torch import Tensor, nn
from tqdm.auto import tqdm

from captum_consistency.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["fgsm_accuracy", "IMAGENET_MEAN", "IMAGENET_STD"]

#: The paper's epsilons (Table 6), on the 0-255 pixel scale.
PAPER_EPSILONS = (1, 2, 8, 16, 32, 64)


def _per_sample_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    # (N,) losses: Captum differentiates each sample's loss separately
    return F.cross_entropy(logits, labels, reduction="none")


def _channel_vector(values: Sequence[float], name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be a non-empty sequence of finite floats, got {values!r}")
    return t


@torch.no_grad()
def _correct(model: nn.Module, images: Tensor, labels: Tensor) -> int:
    return int((model(images).argmax(1) == labels).sum())


def fgsm_accuracy(
    model: nn.Module,
    data: Iterable[Tuple[Tensor, Tensor]],
    epsilons: Sequence[float] = PAPER_EPSILONS,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: Union[None, str, torch.device] = None,
    progress: bool = True,
) -> Dict[float, float]:
    r"""Top-1 accuracy under the untargeted FGSM attack (Goodfellow et al. 2015), per epsilon.

    For each image ``x`` (normalised as the model expects) with label ``y``, the adversarial
    image is

    .. math::

        x' = \mathrm{clip}_{[(0 - \mu_c) / \sigma_c,\ (1 - \mu_c) / \sigma_c]}
        \Big(x + \frac{\epsilon}{255\, \sigma_c} \operatorname{sign} \nabla_x
        \mathrm{CE}(f(x), y)\Big),

    i.e. an ``L_inf`` step of ``epsilon`` grey levels in pixel space, converted to the
    normalised space per channel, and clamped to the valid pixel range ``[0, 1]`` (per channel
    in normalised space). This is the evaluation of Table 6 of the paper (ResNet-50, epsilons
    1, 2, 8, 16, 32, 64).

    The attack is Captum's :class:`captum.robust.FGSM` with a per-sample cross-entropy loss
    (its default, ``-log(output)``, expects probabilities). Since the FGSM direction
    ``sign(grad)`` does not depend on epsilon, Captum's attack is run once per batch with a
    unit step and no bounds, the direction is read back from its result, and each epsilon is
    applied from it: one forward-backward pass per batch instead of one per epsilon, with the
    same images as calling ``FGSM.perturb`` once per epsilon (checked in the tests). Gradients
    smaller than Captum's ``zero_thresh`` (``1e-6``) leave the pixel unchanged, as in Captum.
    Epsilon ``0`` is the clean accuracy. The model is evaluated in eval mode; its mode is
    restored afterwards (module by module).

    Args:
        model (torch.nn.Module): classifier taking normalised images, returning logits.
        data (iterable): a ``DataLoader`` or any iterable of ``(images, labels)`` batches;
            images ``(N, C, H, W)`` normalised with ``mean``/``std``, labels ``(N,)`` class indices.
        epsilons (sequence of float): attack strengths on the 0-255 scale, non-negative.
        mean (sequence of float): per-channel mean of the normalisation (0-1 pixel scale).
        std (sequence of float): per-channel standard deviation of the normalisation.
        device (str or torch.device, optional): where to run; ``None``: the model's device.
        progress (bool): show a tqdm progress bar over the batches.

    Returns:
        dict mapping each epsilon (as given) to the top-1 accuracy in ``[0, 1]``.

    Raises:
        ValueError: a negative epsilon, an empty dataset, mismatched mean/std, or images whose
            channel count does not match them.

    Examples::

        >>> loader = DataLoader(imagenet_val, batch_size=128)
        >>> fgsm_accuracy(model, loader)  # doctest: +SKIP
        {1: 0.031, 2: 0.030, 8: 0.029, 16: 0.029, 32: 0.023, 64: 0.011}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    epsilons = tuple(epsilons)
    if not epsilons:
        raise ValueError("epsilons must not be empty")
    for eps in epsilons:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"epsilons must be non-negative numbers (0-255 scale), got {eps!r}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    mean_t = _channel_vector(mean, "mean", device)
    std_t = _channel_vector(std, "std", device)
    if mean_t.numel() != std_t.numel():
        raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
    if not bool((std_t > 0).all()):
        raise ValueError(f"std must be positive, got {std!r}")
    shape = (1, -1, 1, 1)
    lower = ((0.0 - mean_t) / std_t).view(shape)
    upper = ((1.0 - mean_t) / std_t).view(shape)
    steps = {eps: (float(eps) / 255.0 / std_t).view(shape) for eps in epsilons}

    # Unit step, no bound: perturb(x) - x is exactly sign(grad) (0 where |grad| <= zero_thresh).
    attack = FGSM(model, loss_func=_per_sample_cross_entropy)
    correct = {eps: 0 for eps in epsilons}
    total = 0
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        bar = tqdm(data, desc="FGSM", unit="batch", disable=not progress, leave=False)
        for batch in bar:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("data must yield (images, labels) batches")
            images, labels = batch[0], batch[1]
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device, non_blocking=True).long()
            if images.dim() != 4 or images.shape[1] != mean_t.numel():
                raise ValueError(
                    f"images must be (N, {mean_t.numel()}, H, W) to match mean/std, "
                    f"got {tuple(images.shape)}"
                )
            if any(eps > 0 for eps in epsilons):
                # a detached view requiring grad: no warning from Captum, the caller's tensor untouched
                stepped = attack.perturb(images.detach().requires_grad_(True), epsilon=1.0, target=labels)
                direction = torch.sign(stepped - images)
            for eps in epsilons:
                if eps == 0:
                    adversarial = images
                else:
                    adversarial = torch.clamp(images + steps[eps] * direction, lower, upper)
                correct[eps] += _correct(model, adversarial, labels)
            total += labels.numel()
    finally:
        for m, mode in modes.items():
            m.training = mode
    if total == 0:
        raise ValueError("data yielded no samples")
    return {eps: correct[eps] / total for eps in epsilons}
