"""The Grad-CAM consistency term of Pillai & Pirsiavash (AAAI 2021, Eq. 5) as a function.

[`gc_consistency`][captum_consistency.gc_consistency] is to
[`GradCamConsistencyLoss`][captum_consistency.GradCamConsistencyLoss] what
``torch.nn.functional.cross_entropy`` is to ``torch.nn.CrossEntropyLoss``: the loss module
builds the composites, runs the model and computes the maps, then calls it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_consistency.composition import compose_grid
from captum_consistency.saliency import DEFAULT_EPS, normalize_saliency

__all__ = [
    "gc_consistency",
    "GCConsistency",
    "energy_loss",
    "l1_mask_loss",
    "ppce_loss",
    "rrr_loss",
    "rrr_gradcam_loss",
    "cgc_infonce",
    "check_masks",
]

_REDUCTIONS = ("mean", "sum", "none")


class GCConsistency(NamedTuple):
    """What ``gc_consistency(..., return_maps=True)`` returns."""

    loss: Tensor  #: the reduced L1 term (per image with ``reduction="none"``)
    saliency: Tensor  #: ``(N, 1, h, w)`` the single images' normalised maps ``g_x``
    composite_saliency: Tensor  #: ``(N, 1, 2h, 2w)`` the composites' normalised maps ``g_c``


def gc_consistency(
    map_x: Tensor,
    map_c: Tensor,
    cells: Tensor,
    eps: float = DEFAULT_EPS,
    detach_target: bool = False,
    reduction: str = "mean",
    return_maps: bool = False,
    check: bool = True,
) -> Union[Tensor, GCConsistency]:
    r"""Grad-CAM consistency (Eq. 5): L1 between a composite's map and the zero-padded image map.

    Both maps are normalised to sum one, ``g = m / (m.sum() + eps)``
    ([`normalize_saliency`][captum_consistency.normalize_saliency]); the single image's map is
    zero-padded into cell ``k`` of the 2x2 grid (Eq. 4,
    [`compose_grid`][captum_consistency.compose_grid]) and compared with the composite's:

    .. math::

        \ell_k(g_x, g_c) = \frac{1}{4hw} \sum_{ij}
        \big| g_c - \mathrm{comp}(k, g_x, 0, 0, 0) \big|_{ij},

    the mean over the composite map's locations, as the authors compute it. The target is not
    detached unless asked (as in the authors' code), so the gradient reaches both maps.

    Args:
        map_x (Tensor): ``(N, 1, h, w)`` non-negative maps of the single images (after the ReLU
            of Eq. 3).
        map_c (Tensor): ``(N, 1, 2h, 2w)`` non-negative maps of their composites, for the same
            classes.
        cells (Tensor): ``(N,)`` cell of each image in its composite.
        eps (float): the normaliser's ``eps``.
        detach_target (bool): stop the gradient through ``map_x``.
        reduction (str): ``"mean"`` over the images, ``"sum"``, or ``"none"`` (one value each).
        return_maps (bool): also return the normalised maps (detached).
        check (bool): check the shapes, the cells and the maps' sign. ``False`` trusts them
            (``cells`` on the maps' device), which keeps a training step free of host-device
            synchronisations.

    Returns:
        Tensor (scalar, or ``(N,)`` with ``reduction="none"``), or a :class:`GCConsistency`
        with ``return_maps``.

    Raises:
        ValueError: ``map_c`` is not twice ``map_x``'s size, bad cells, negative maps, or an
            unknown ``reduction``.

    Examples::

        >>> cam = lambda a, g: elementwise_grad_cam(a, g)             # Eq. 3
        >>> loss = gc_consistency(cam(acts_x, grads_x), cam(acts_c, grads_c), cells)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if check:
        n, _, h, w = map_x.shape
        if map_c.dim() != 4 or map_c.shape[0] != n or tuple(map_c.shape[-2:]) != (2 * h, 2 * w):
            raise ValueError(
                f"map_c must be (N, 1, 2h, 2w) = {(n, 1, 2 * h, 2 * w)} for map_x "
                f"{tuple(map_x.shape)}, got {tuple(map_c.shape)}"
            )
    g_x = normalize_saliency(map_x, eps, check=check)
    g_c = normalize_saliency(map_c, eps, check=check)
    # Eq. 4: the single image's map zero-padded into its cell
    target = compose_grid(g_x.detach() if detach_target else g_x, cells=cells, check=check)
    per_image = (g_c - target).abs().flatten(1).mean(dim=1)
    loss = per_image if reduction == "none" else per_image.sum() if reduction == "sum" else per_image.mean()
    return GCConsistency(loss, g_x.detach(), g_c.detach()) if return_maps else loss


# ---------------------------------------------------------------------------------------------
# Explanation-guided losses (functional twins of captum_consistency.losses.guided / .cgc)
# ---------------------------------------------------------------------------------------------

#: The smallest total attribution Energy divides by (Rao et al.'s code: below it, ``1 - inside``).
ENERGY_EPS = 1e-7
#: PPCE's ``log`` is taken of ``max(a, PPCE_EPS)`` (torch's BCE clamps its gradient at 1e-12).
PPCE_EPS = 1e-12


def _reduce(per_image: Tensor, reduction: str) -> Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return per_image if reduction == "none" else per_image.sum() if reduction == "sum" else per_image.mean()


def check_masks(masks: Tensor, n: int, size=None, argname: str = "masks") -> Tensor:
    """``(N, H, W)`` float masks in [0, 1] from bool or float ``(N, H, W)`` / ``(N, 1, H, W)``.

    Args:
        masks (Tensor): the object masks (1 inside the object or box).
        n (int): the batch size.
        size (tuple of int, optional): the ``(H, W)`` the masks must have (the images').
        argname (str): the name in messages.

    Returns:
        Tensor ``(N, H, W)``, floating point.

    Raises:
        ValueError: not a tensor, a wrong number of dimensions, of masks, or a wrong size.
    """
    if not isinstance(masks, Tensor):
        raise ValueError(f"{argname} must be a (N, H, W) tensor, got {type(masks).__name__}")
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[0] != n:
        raise ValueError(
            f"{argname} must be ({n}, H, W) or ({n}, 1, H, W), one mask per image, got {tuple(masks.shape)}"
        )
    if size is not None and tuple(masks.shape[-2:]) != tuple(size):
        raise ValueError(
            f"{argname} are {tuple(masks.shape[-2:])} but the images are {tuple(size)}: give masks "
            "at the images' size (transform them with the images)"
        )
    if masks.is_complex():
        raise ValueError(f"{argname} must be bool or real, got {masks.dtype}")
    return masks.float() if not masks.is_floating_point() else masks


def _postprocess(maps: Tensor, size, only_positive: bool, max_normalise: bool) -> Tensor:
    """Rao et al.'s attribution post-processing, in their order: ``clamp(min=0)`` (only
    positive), division by the per-image ``max |a|`` (an all-zero map stays zero), bilinear
    resize to the mask's size."""
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be (N, 1, h, w), got {tuple(maps.shape)}")
    if only_positive:
        maps = maps.clamp(min=0)
    if max_normalise:
        peak = maps.abs().amax(dim=(1, 2, 3), keepdim=True)
        maps = maps / torch.where(peak > 0, peak, torch.ones_like(peak))
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps[:, 0]


def energy_loss(maps: Tensor, masks: Tensor, reduction: str = "mean") -> Tensor:
    r"""Energy loss (Rao et al., ICCV 2023): one minus the share of positive attribution inside.

    .. math::

        \mathcal{L}_E = 1 - \frac{\sum_{ij} M_{ij}\, a^+_{ij}}{\sum_{ij} a^+_{ij}},
        \qquad a^+ = \max(a, 0),

    with ``a`` the map resized bilinearly to the mask's size (not normalised: Energy is
    scale-free). As in the authors' code, a total below :data:`ENERGY_EPS` gives
    ``1 - inside`` instead of the quotient (never NaN). An all-false mask gives 1, an all-true
    mask 0 (both constant).

    Args:
        maps (Tensor): ``(N, 1, h, w)`` attributions (signed allowed).
        masks (Tensor): ``(N, H, W)`` bool or float masks in [0, 1].
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Tensor: scalar, or ``(N,)`` with ``reduction="none"``.

    Examples::

        >>> energy_loss(cam, boxes_to_mask(...))   # 0 when all positive attribution is inside
    """
    masks = check_masks(masks, maps.shape[0])
    a = _postprocess(maps, masks.shape[-2:], only_positive=False, max_normalise=False).clamp(min=0)
    inside = (a * masks).flatten(1).sum(1)
    total = a.flatten(1).sum(1)
    per_image = torch.where(total < ENERGY_EPS, 1 - inside, 1 - inside / total.clamp_min(ENERGY_EPS))
    return _reduce(per_image, reduction)


def l1_mask_loss(maps: Tensor, masks: Tensor, reduction: str = "mean") -> Tensor:
    r"""L1 loss to the mask (GRADIA, Gao et al. 2022, as compared by Rao et al., ICCV 2023).

    .. math::

        \mathcal{L}_{L1} = \frac{1}{HW} \sum_{ij} \big| \hat a_{ij} - M_{ij} \big|,
        \qquad \hat a = \frac{\max(a, 0)}{\max_{ij} |a|}

    resized bilinearly to the mask's size (the authors' order: positive part, division by the
    maximum, resize). An all-zero map stays zero.

    Args:
        maps (Tensor): ``(N, 1, h, w)`` attributions.
        masks (Tensor): ``(N, H, W)`` masks.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Tensor: scalar, or ``(N,)``.

    Examples::

        >>> l1_mask_loss(cam, masks)
    """
    masks = check_masks(masks, maps.shape[0])
    a = _postprocess(maps, masks.shape[-2:], only_positive=True, max_normalise=True)
    return _reduce((a - masks).abs().flatten(1).mean(1), reduction)


def ppce_loss(maps: Tensor, masks: Tensor, reduction: str = "mean") -> Tensor:
    r"""Per-pixel cross-entropy (PPCE, HAICS of Shen et al. 2021, as compared by Rao et al.).

    Binary cross-entropy of the normalised map against 1 on the mask's pixels only:

    .. math::

        \mathcal{L}_{PPCE} = -\frac{1}{\sum M} \sum_{ij} M_{ij} \log \hat a_{ij},
        \qquad \hat a = \frac{\max(a, 0)}{\max_{ij} |a|}

    (resized to the mask's size). ``log`` is taken of ``max(a, PPCE_EPS)`` (1e-12): finite
    values and gradients where the map is zero (torch's ``BCELoss`` clamps the log at -100
    instead). An all-false mask gives 0.

    Args:
        maps (Tensor): ``(N, 1, h, w)`` attributions.
        masks (Tensor): ``(N, H, W)`` masks.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Tensor: scalar, or ``(N,)``.

    Examples::

        >>> ppce_loss(cam, masks)
    """
    masks = check_masks(masks, maps.shape[0])
    a = _postprocess(maps, masks.shape[-2:], only_positive=True, max_normalise=True)
    nll = -torch.log(a.clamp_min(PPCE_EPS))
    count = masks.flatten(1).sum(1)
    per_image = (nll * masks).flatten(1).sum(1) / count.clamp_min(1)
    return _reduce(per_image, reduction)


def rrr_gradcam_loss(maps: Tensor, masks: Tensor, reduction: str = "mean") -> Tensor:
    r"""RRR on an attribution map (Rao et al.'s RRR*, ICCV 2023): squared attribution outside.

    .. math::

        \mathcal{L}_{RRR^*} = \sum_{ij} (1 - M_{ij})\, \hat a_{ij}^2,
        \qquad \hat a = \frac{a}{\max_{ij} |a|}

    (signed, resized to the mask's size; a sum over pixels, as the authors compute it).

    Args:
        maps (Tensor): ``(N, 1, h, w)`` attributions (Grad-CAM for ``--loss rrr-gradcam``).
        masks (Tensor): ``(N, H, W)`` masks.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Tensor: scalar, or ``(N,)``.

    Examples::

        >>> rrr_gradcam_loss(cam, masks)
    """
    masks = check_masks(masks, maps.shape[0])
    a = _postprocess(maps, masks.shape[-2:], only_positive=False, max_normalise=True)
    return _reduce((a.square() * (1 - masks)).flatten(1).sum(1), reduction)


def rrr_loss(input_gradients: Tensor, masks: Tensor, reduction: str = "mean") -> Tensor:
    r"""Right for the Right Reasons (Ross, Hughes & Doshi-Velez, IJCAI 2017), the explanation term.

    With ``A = 1 - M`` the irrelevant region (outside the mask) and ``\hat y_k`` the predicted
    probabilities,

    .. math::

        \mathcal{L}_{RRR} = \sum_{c,i,j} \Big( A_{ij}\, \frac{\partial}{\partial x_{cij}}
        \sum_k \log \hat y_k \Big)^2

    summed over the input's channels and pixels (Eq. 1 of the paper, per image).

    Args:
        input_gradients (Tensor): ``(N, C, H, W)`` gradients of ``sum_k log softmax(f(x))_k``
            with respect to the input (kept in the graph, ``create_graph=True``).
        masks (Tensor): ``(N, H, W)`` masks (1 = relevant).
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Tensor: scalar, or ``(N,)``.

    Examples::

        >>> x = images.requires_grad_()
        >>> (g,) = torch.autograd.grad(model(x).log_softmax(1).sum(), x, create_graph=True)
        >>> rrr_loss(g, masks)
    """
    if input_gradients.dim() != 4:
        raise ValueError(f"input_gradients must be (N, C, H, W), got {tuple(input_gradients.shape)}")
    masks = check_masks(masks, input_gradients.shape[0], input_gradients.shape[-2:])
    outside = (1 - masks)[:, None]
    return _reduce((outside * input_gradients).square().flatten(1).sum(1), reduction)


def cgc_infonce(
    query: Tensor,
    positive: Tensor,
    temperature: float = 0.5,
    negatives: Optional[Tensor] = None,
    self_index: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    r"""The contrastive term of CGC (Pillai, Koohpayegani, Ouligian, Fong, Pirsiavash, CVPR 2022).

    ``q_i`` is the Grad-CAM of image ``i``'s augmented view and ``k_i`` the same augmentation
    applied to the Grad-CAM of the original; both flattened and L2-normalised. The negatives
    are the augmented views' maps of the other images (as in the authors' code, which uses
    ``q_j, j != i``):

    .. math::

        \mathcal{L}_{CGC} = -\frac{1}{N}\sum_i \log
        \frac{\exp(q_i \cdot k_i / \tau)}{\exp(q_i \cdot k_i / \tau)
        + \sum_{j \ne i} \exp(q_i \cdot q_j / \tau)}

    Args:
        query (Tensor): ``(N, ...)`` maps of the augmented views.
        positive (Tensor): ``(N, ...)`` augmented maps of the originals.
        temperature (float): ``tau`` (0.5 in the authors' ImageNet command).
        negatives (Tensor, optional): ``(M, ...)`` the negatives' maps; default ``query``
            itself. Pass the maps gathered from every process for negatives across ranks.
        self_index (Tensor, optional): ``(N,)`` the row of ``negatives`` that is each query
            itself (excluded); default ``0..N-1``, right when ``negatives`` is ``query``.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Tensor: scalar, or ``(N,)``.

    Raises:
        ValueError: fewer than one negative per query, mismatched shapes, ``tau <= 0``.

    Examples::

        >>> cgc_infonce(cam_aug, crop_and_flip(cam, boxes, flips, size), temperature=0.5)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query.shape != positive.shape or query.dim() < 2:
        raise ValueError(
            f"query and positive must be (N, ...) of the same shape, got {tuple(query.shape)} and "
            f"{tuple(positive.shape)}"
        )
    q = F.normalize(query.flatten(1), dim=1)
    k = F.normalize(positive.flatten(1), dim=1)
    n = q.shape[0]
    if negatives is None:
        negs, self_index = q, torch.arange(n, device=q.device)
    else:
        negs = F.normalize(negatives.flatten(1), dim=1)
        if self_index is None:
            self_index = torch.arange(n, device=q.device)
    if negs.shape[0] < 2:
        raise ValueError(
            "CGC needs at least 2 images in the batch (the other images' maps are the negatives), "
            f"got {negs.shape[0]}; raise the batch size"
        )
    pos = (q * k).sum(1, keepdim=True)
    sim = q @ negs.t()
    keep = torch.ones_like(sim, dtype=torch.bool)
    keep[torch.arange(n, device=q.device), self_index.to(q.device)] = False
    neg = sim[keep].view(n, negs.shape[0] - 1)
    logits = torch.cat([pos, neg], dim=1) / temperature
    per_image = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=q.device), reduction="none")
    return _reduce(per_image, reduction)
