r"""The model-parameter randomisation test of Adebayo et al. ("Sanity checks for saliency maps",
NeurIPS 2018), cascading from the top.

The model's blocks are re-initialised one after the other from the output down (torch's own
``reset_parameters`` of every sub-module of the block, cumulatively), and after each step the
Spearman rank correlation between the trained model's map and the randomised model's map of the
same image and class is measured. A map that still correlates once the layers that produce the
class score are random does not explain the model: it is a red flag.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["spearman_correlation", "RandomizationStep", "cascading_randomization"]


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks ``0..M-1`` of each row of ``(N, M)``, ties given their average rank (as
    :func:`scipy.stats.rankdata`'s ``"average"``), batched: the rank of a value is the mean of
    the first and last positions it takes in the sorted row."""
    sorted_x = x.sort(dim=1).values
    left = torch.searchsorted(sorted_x, x.contiguous(), right=False)
    right = torch.searchsorted(sorted_x, x.contiguous(), right=True)
    return (left + right - 1).to(torch.float64) / 2


def spearman_correlation(a: Tensor, b: Tensor) -> Tensor:
    r"""Spearman's rank correlation of each pair of rows (maps flattened), ties averaged.

    :math:`\rho = \mathrm{corr}(\mathrm{rank}(a), \mathrm{rank}(b))`, Pearson's correlation of the
    average ranks, which equals :func:`scipy.stats.spearmanr` with ties. NaN where a map is
    constant (its ranks have no variance).

    Args:
        a (Tensor): ``(N, ...)`` maps.
        b (Tensor): ``(N, ...)`` maps of the same shape.

    Returns:
        Tensor ``(N,)`` float64 in [-1, 1] (NaN for a constant map).
    """
    if a.shape != b.shape or a.dim() < 1:
        raise ValueError(f"a and b must have the same shape (N, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    ra = _average_ranks(a.reshape(a.shape[0], -1).double())
    rb = _average_ranks(b.reshape(b.shape[0], -1).double())
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(denom > 0, (ra * rb).sum(1) / denom.clamp(min=1e-300),
                       torch.full_like(denom, float("nan")))


@dataclass
class RandomizationStep:
    """One step of :func:`cascading_randomization`.

    Attributes:
        block (str): the last block re-initialised (every block above it is random too).
        correlation (Tensor): ``(N,)`` Spearman correlation of each image's map with the trained
            model's; NaN where either map is constant (e.g. all zero).
    """

    block: str
    correlation: Tensor

    def mean(self) -> Optional[float]:
        """The mean correlation over the images where it is defined (``None`` if none)."""
        valid = self.correlation[~torch.isnan(self.correlation)]
        return float(valid.mean()) if valid.numel() else None


def _blocks(model: nn.Module) -> List[str]:
    """The model's direct children that hold parameters, from the output down."""
    names = [name for name, child in model.named_children()
             if any(True for _ in child.parameters())]
    return names[::-1]


def _reset(module: nn.Module) -> int:
    count = 0
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
            count += 1
    return count


def cascading_randomization(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    explain: Callable[[nn.Module, Tensor, Tensor], Tensor],
    blocks: Optional[Sequence[str]] = None,
    seed: int = 0,
    upsample: bool = True,
) -> List[RandomizationStep]:
    r"""Cascading model-parameter randomisation (Adebayo et al., 2018), Spearman's rank
    correlation after each step.

    A copy of ``model`` is re-initialised block by block from the top (``blocks``, by default
    the model's direct children that have parameters, output first: ``fc``, ``layer4``, ...,
    ``conv1`` for a ResNet), with torch's ``reset_parameters`` of every sub-module (batch norm's
    statistics included) under a fixed seed; the model itself is never changed. After each
    step, ``explain(copy, images, targets)`` is compared with the trained model's maps.

    Args:
        model (torch.nn.Module): the trained classifier.
        images (Tensor): ``(N, C, H, W)`` single images.
        targets (Tensor): ``(N,)`` the class explained for each image.
        explain (Callable): ``(model, images, targets) -> (N, 1, h, w)`` maps, e.g. the
            element-wise Grad-CAM of a layer found by name in the model given
            (:func:`captum_consistency.engine.gradcam_explainer`).
        blocks (sequence of str, optional): names of the children to re-initialise, in order.
        seed (int): seed of the re-initialisation (the global RNG state is restored).
        upsample (bool): compare the maps resized bilinearly to the image size, as the metrics
            score them (``False``: at the map's own resolution).

    Returns:
        list of RandomizationStep, one per block, in the order re-initialised.

    Examples::

        >>> steps = cascading_randomization(model, images, labels, explain)
        >>> [(s.block, round(s.mean(), 2)) for s in steps]
        [('fc', 0.93), ('layer4', 0.12), ...]
    """
    names = list(blocks) if blocks is not None else _blocks(model)
    if not names:
        raise ValueError("the model has no child module with parameters to re-initialise; pass blocks=")
    children = dict(model.named_children())
    unknown = [b for b in names if b not in children]
    if unknown:
        raise ValueError(f"unknown blocks {unknown}; the model's children are {list(children)}")

    def maps_of(m: nn.Module) -> Tensor:
        out = explain(m, images, targets).detach().float()
        if upsample and out.shape[-2:] != images.shape[-2:]:
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return out

    reference = maps_of(model)
    randomized = copy.deepcopy(model)
    steps: List[RandomizationStep] = []
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name in names:
            if _reset(getattr(randomized, name)) == 0:
                raise ValueError(f"block {name!r} has no sub-module with reset_parameters()")
            steps.append(RandomizationStep(name, spearman_correlation(reference, maps_of(randomized))))
    return steps
