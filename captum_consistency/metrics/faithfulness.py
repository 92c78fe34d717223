r"""Faithfulness of saliency maps: does removing what a map marks change the model's output?

Training on explanations can make a map *move* without it telling the truth about the model.
These scores tell the two apart on single images:

* :func:`deletion_curves` -- the pixels of each image are replaced in the order of its map,
  most relevant first (MoRF) and least relevant first (LeRF), and the class probability is read
  after each step (Samek et al., "Evaluating the visualization of what a deep neural network
  has learned", 2017). Batched: one forward pass of the whole batch per step. Its summary,
  :attr:`DeletionCurves.area_between`, is the mean of ``LeRF - MoRF`` over the steps: high when
  the marked pixels are the ones the model needs.
* :func:`road_score` -- the same comparison with ROAD's noisy linear imputation instead of a
  constant (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution
  Methods", ICML 2022), through pytorch-grad-cam's
  :class:`pytorch_grad_cam.metrics.road.ROADCombined`, which removes the out-of-distribution
  shortcut of a constant replacement at the price of one sparse solve per image and
  percentile (computed on the CPU, image by image).

Both are meant to be compared with the same score of random maps (:func:`random_maps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_consistency._modes import eval_mode
from captum_consistency.metrics.ablation import _logits_of

__all__ = ["DeletionCurves", "deletion_curves", "road_score", "random_maps"]


@dataclass
class DeletionCurves:
    """What :func:`deletion_curves` returns.

    Attributes:
        fractions (Tensor): ``(K,)`` the shares of pixels removed at each step.
        morf (Tensor): ``(N, K)`` class probability with the most relevant pixels removed.
        lerf (Tensor): ``(N, K)`` the same with the least relevant pixels removed.
    """

    fractions: Tensor
    morf: Tensor
    lerf: Tensor

    @property
    def area_between(self) -> Tensor:
        """``(N,)`` the mean over the steps of ``LeRF - MoRF``: the area between the two curves
        (trapezoid-free: the steps are equally spaced). Positive: removing what the map marks
        hurts the class more than removing what it leaves out."""
        return (self.lerf - self.morf).mean(dim=1)


def _check_maps(images: Tensor, maps: Tensor, targets: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', images)}")
    n, _, h, w = images.shape
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4) or maps.shape[0] != n:
        raise ValueError(f"maps must be (N, 1, h, w) or (N, h, w) with N = {n}, got "
                         f"{getattr(maps, 'shape', type(maps).__name__)}")
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"maps must have one channel, got {maps.shape[1]}")
        maps = maps[:, 0]
    if not isinstance(targets, Tensor) or targets.shape != (n,) or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be a (N,) integer tensor with N = {n}, got "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    maps = maps.to(images.device).float()
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return torch.nan_to_num(maps, nan=0.0)


def random_maps(like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform random maps shaped like ``like`` (``(N, 1, h, w)`` maps at a layer's resolution):
    the chance level of a faithfulness score, at the same granularity as the maps compared."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(like.shape, generator=generator, device=gen_device).to(like.device)


def deletion_curves(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    steps: int = 10,
    baseline: float = 0.0,
) -> DeletionCurves:
    r"""MoRF and LeRF deletion curves of saliency maps (Samek et al., 2017).

    The map of each image is resized bilinearly to the image; at step ``s`` of ``steps`` the
    ``s / steps`` share of its pixels with the highest (MoRF) or lowest (LeRF) values is set to
    ``baseline`` (ties broken by position), and the softmax probability of the target is read.
    One forward pass of the batch per step and order; eval mode, the model's mode restored.

    Args:
        model (torch.nn.Module): the classifier.
        images (Tensor): ``(N, C, H, W)`` single images.
        maps (Tensor): ``(N, 1, h, w)`` or ``(N, h, w)`` saliency maps (any resolution).
        targets (Tensor): ``(N,)`` the class each map explains.
        steps (int): removal steps; the fractions are ``1/steps, ..., (steps-1)/steps`` (the
            empty and the full removal are the same for every map and are left out).
        baseline (float): the replacement value (0: the data set's mean colour for normalised
            inputs).

    Returns:
        DeletionCurves: ``fractions``, ``morf`` and ``lerf``; ``area_between`` summarises them.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    maps = _check_maps(images, maps, targets)
    n, _, h, w = images.shape
    flat = maps.reshape(n, -1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=images.device).expand(n, -1))
    rank = rank.view(n, 1, h, w)  # 0 = the most relevant pixel
    fractions = torch.arange(1, steps, device=images.device, dtype=torch.float32) / steps
    morf = images.new_empty((n, steps - 1), dtype=torch.float32)
    lerf = torch.empty_like(morf)
    targets = targets.to(images.device)
    with eval_mode(model), torch.no_grad():
        for s, fraction in enumerate(fractions.tolist()):
            k = int(round(fraction * h * w))
            removed_top = rank < k
            removed_bottom = rank >= h * w - k
            batch = torch.cat([images.masked_fill(removed_top, baseline),
                               images.masked_fill(removed_bottom, baseline)])
            prob = F.softmax(_logits_of(model(batch)).float(), dim=1)
            p = prob.gather(1, torch.cat([targets, targets]).view(-1, 1)).squeeze(1)
            morf[:, s], lerf[:, s] = p[:n], p[n:]
    return DeletionCurves(fractions=fractions, morf=morf, lerf=lerf)


def road_score(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    percentiles: Sequence[int] = (20, 40, 60, 80),
) -> Tensor:
    r"""ROAD (Rong et al., ICML 2022) of saliency maps: pytorch-grad-cam's
    :class:`~pytorch_grad_cam.metrics.road.ROADCombined` on the class's softmax probability.

    For each percentile ``p`` the pixels above (MoRF) or below (LeRF) the map's ``p``-th
    percentile are imputed by ROAD's noisy linear imputer; the score is the mean over the
    percentiles of ``(change under LeRF - change under MoRF) / 2``: positive when the map marks
    what the model needs. pytorch-grad-cam computes it image by image on the CPU (one sparse
    solve per image, percentile and order), so use it on a subset.

    Args:
        model (torch.nn.Module): the classifier.
        images (Tensor): ``(N, C, H, W)``.
        maps (Tensor): ``(N, 1, h, w)`` or ``(N, h, w)`` maps (resized to the images).
        targets (Tensor): ``(N,)`` classes.
        percentiles (sequence of int): percentiles in (0, 100).

    Returns:
        Tensor ``(N,)`` float32 on the CPU.
    """
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    if not percentiles or any(not 0 < int(p) < 100 for p in percentiles):
        raise ValueError(f"percentiles must be integers in (0, 100), got {list(percentiles)}")
    maps = _check_maps(images, maps, targets)
    cams = maps.cpu().numpy().astype(np.float32)
    # min-max per map, as pytorch-grad-cam's CAMs are scaled before its metrics
    lo = cams.min(axis=(1, 2), keepdims=True)
    hi = cams.max(axis=(1, 2), keepdims=True)
    cams = (cams - lo) / np.maximum(hi - lo, 1e-12)
    metric = ROADCombined(percentiles=[int(p) for p in percentiles])
    with eval_mode(model):
        scores = metric(images, cams, [ClassifierOutputSoftmaxTarget(int(t)) for t in targets.tolist()],
                        model)
    return torch.as_tensor(np.asarray(scores, dtype=np.float32)).reshape(-1)
