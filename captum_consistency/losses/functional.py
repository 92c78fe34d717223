"""The Grad-CAM consistency term of Pillai & Pirsiavash (AAAI 2021, Eq. 5) as a function.

[`gc_consistency`][captum_consistency.gc_consistency] is to
[`GradCamConsistencyLoss`][captum_consistency.GradCamConsistencyLoss] what
``torch.nn.functional.cross_entropy`` is to ``torch.nn.CrossEntropyLoss``: the loss module
builds the composites, runs the model and computes the maps, then calls it.
"""

from __future__ import annotations

from typing import NamedTuple, Union

from torch import Tensor

from captum_consistency.composition import compose_grid
from captum_consistency.saliency import DEFAULT_EPS, normalize_saliency

__all__ = ["gc_consistency", "GCConsistency"]

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
