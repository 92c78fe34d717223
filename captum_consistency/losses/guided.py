"""Mask- and box-guided explanation losses: Energy, L1, PPCE, RRR and RRR on Grad-CAM.

Each loss is ``classification + lam * term``, the term computed on a differentiable
attribution chosen by name (:data:`~captum_consistency.attr.DIFFERENTIABLE_ATTRIBUTIONS`) from
the training forward pass, against a per-image object mask (a box rasterised with
:func:`~captum_consistency.metrics.boxes_to_mask`, a segmentation, the shapes benchmark's exact
masks). The terms are the functions of :mod:`captum_consistency.losses.functional`; the modules
add the attribution, the mask checks, the counted skip of degenerate masks and the check, on the
first training step, that the term's gradient reaches the parameters below the attribution
layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from captum_consistency.attr._differentiable import (
    INPUT_ATTRIBUTIONS,
    AttributionMaps,
    ModulesBelow,
    check_graph_reaches_parameters,
    differentiable_attribution,
)
from captum_consistency.attr._layers import check_layer_in_model, layer_name
from captum_consistency.losses.functional import (
    check_masks,
    energy_loss,
    l1_mask_loss,
    ppce_loss,
    rrr_gradcam_loss,
    rrr_loss,
)

__all__ = [
    "GuidedLossOutput",
    "EnergyLoss",
    "L1MaskLoss",
    "PPCELoss",
    "RRRLoss",
    "RRRGradCamLoss",
]


@dataclass
class _ExplanationOutput:
    """The fields every explanation-guided loss returns (see its output class)."""

    loss: Tensor
    classification: Tensor
    explanation: Tensor
    logits: Tensor

    @property
    def consistency(self) -> Tensor:
        """``explanation``, under the name the training loop logs (``loss/consistency``)."""
        return self.explanation


@dataclass
class GuidedLossOutput(_ExplanationOutput):
    """What the mask-guided losses return.

    Attributes:
        loss: ``classification + lam * explanation``, the scalar to call ``backward()`` on.
        classification: the criterion on the images.
        explanation: the explanation term, the mean over the images with a usable mask
            (0, still attached to the graph, when none has one).
        logits: ``(N, K)`` logits (for accuracy).
        saliency: ``(N, 1, h, w)`` the attribution maps the term was computed on (detached;
            for RRR the squared input gradients summed over channels).
        per_image: ``(N,)`` each image's term (detached; 0 for a skipped image).
        skipped: ``(N,)`` bool, images whose mask is all-false (no object) or all-true
            (object everywhere): there is nothing to move the attribution to or from, so they
            do not enter ``explanation``. ``num_skipped`` (a property) is their number, read
            on the host (the training loop sums ``skipped`` on the device instead).

    Examples::

        >>> out = EnergyLoss(model, model.layer4)(images, labels, masks)
        >>> out.loss.backward(); out.num_skipped
    """

    saliency: Tensor
    per_image: Tensor
    skipped: Tensor

    @property
    def num_skipped(self) -> int:
        """``int(skipped.sum())``: the images left out of the term."""
        return int(self.skipped.sum())


def _as_lam(lam) -> float:
    from captum_consistency.losses.gc import _as_lambda

    return _as_lambda(lam)


def _check_images_targets(images: Tensor, targets: Tensor, gradcam_targets: Optional[Tensor]) -> Tensor:
    """``(N,)`` long classes to explain, after the shape checks every loss shares."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}"
        )
    n = images.shape[0]
    if not isinstance(targets, Tensor) or targets.shape[:1] != (n,):
        raise ValueError(f"targets must have one row per image ({n}), got {getattr(targets, 'shape', targets)}")
    classes = gradcam_targets if gradcam_targets is not None else targets
    if classes.dim() != 1 or classes.is_floating_point() or classes.dtype == torch.bool:
        raise ValueError(
            "gradcam_targets (N,) integer classes are required when targets are not (N,) class "
            f"indices, got {tuple(classes.shape)} {classes.dtype}"
        )
    return classes.long()


class ExplanationLoss(nn.Module):
    """What the explanation-guided losses share: the model, the attribution, the first-step check.

    Not used directly; see :class:`EnergyLoss`, :class:`~captum_consistency.losses.ContrastiveGradCamLoss`.

    Args:
        model (torch.nn.Module): the classifier (may be wrapped in ``DistributedDataParallel``).
        layer (torch.nn.Module, optional): the attribution layer (``None`` for an attribution
            at the input).
        lam (float): weight of the explanation term.
        attribution (str): a name of :data:`~captum_consistency.attr.DIFFERENTIABLE_ATTRIBUTIONS`.
        criterion (Callable, optional): classification loss; cross-entropy by default.
        check_graph (bool): on the first call in training mode, check that the explanation
            term's gradient reaches the parameters below the attribution layer (one extra
            backward of the term, once).
    """

    #: whether ``forward`` needs ``masks``
    needs_masks = False

    def __init__(
        self,
        model: nn.Module,
        layer: Optional[nn.Module],
        lam: float,
        attribution: str,
        criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        check_graph: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._attribute: Callable[..., AttributionMaps] = differentiable_attribution(attribution)
        self.attribution = attribution
        if attribution in INPUT_ATTRIBUTIONS:
            layer = None
        elif layer is None:
            raise ValueError(f"attribution {attribution!r} needs a layer (e.g. model.layer4)")
        if layer is not None:
            check_layer_in_model(model, layer)
        # Plain attributes, not submodules: the loss must not re-register the model's parameters.
        self.__dict__["model"] = model
        self.__dict__["layer"] = layer
        self.lam = _as_lam(lam)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.check_graph = check_graph
        self._graph_checked = False

    def _where(self) -> str:
        if self.layer is None:
            return "the input"
        return f"layer {layer_name(self.model, self.layer) or type(self.layer).__name__!r}"

    def _checking(self) -> bool:
        return (
            self.check_graph and not self._graph_checked and self.lam > 0
            and self.model.training and torch.is_grad_enabled()
        )

    def _below(self) -> Union[ModulesBelow, "_NoRecord"]:
        return ModulesBelow(self.model, self.layer) if self._checking() else _NoRecord()

    def _combine(self, classification: Tensor, explanation: Tensor, below):
        """``(loss, explanation)``: ``classification + lam * explanation`` after the first-step
        graph check; with ``lam = 0`` the classification alone and the term detached."""
        if self.lam == 0:
            return classification, explanation.detach()
        if isinstance(below, ModulesBelow):
            check_graph_reaches_parameters(explanation, below.parameters(), self._where())
            self._graph_checked = True
        return classification + self.lam * explanation, explanation


class _NoRecord:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class _MaskGuidedLoss(ExplanationLoss):
    """One attribution, one term against a mask: subclasses set ``_term`` (a functional)."""

    needs_masks = True
    _term: Callable[..., Tensor]
    _default_attribution = "gradcam"
    _input_gradients = False  # RRRLoss: the term is on the input gradients of the log-probabilities

    def __init__(
        self,
        model: nn.Module,
        layer: Optional[nn.Module] = None,
        lam: float = 1.0,
        attribution: Optional[str] = None,
        criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        check_graph: bool = True,
    ) -> None:
        if self._input_gradients:  # RRR: the paper's input gradients, no attribution to choose
            if attribution not in (None, "input-gradient"):
                raise ValueError(
                    "RRRLoss penalises input gradients of the log-probabilities (Ross et al.); for "
                    f"a penalty on the attribution {attribution!r} use RRRGradCamLoss"
                )
            layer, attribution = None, "input-x-gradient"
        super().__init__(model, layer, lam, attribution or self._default_attribution, criterion, check_graph)
        if self._input_gradients:
            self.attribution = "input-gradient"

    def _maps(self, images: Tensor, classes: Tensor):
        logits, maps, _ = self._attribute(self.model, self.layer, images, classes)
        return logits, maps, maps

    def forward(
        self,
        images: Tensor,
        targets: Tensor,
        masks: Tensor,
        gradcam_targets: Optional[Tensor] = None,
    ) -> GuidedLossOutput:
        """The loss of a batch.

        Args:
            images (Tensor): ``(N, C, H, W)``.
            targets (Tensor): what ``criterion`` expects (``(N,)`` class indices by default).
            masks (Tensor): ``(N, H, W)`` or ``(N, 1, H, W)`` bool or [0, 1] float object
                masks at the images' size, one per image (of the explained class).
            gradcam_targets (Tensor, optional): ``(N,)`` classes whose attribution is guided;
                default ``targets``.

        Returns:
            GuidedLossOutput

        Raises:
            ValueError: masks of the wrong shape or size, bad images or targets.
            RuntimeError: on the first training step, the term's graph does not reach the
                parameters below the attribution layer (the message names the layer).
        """
        classes = _check_images_targets(images, targets, gradcam_targets)
        masks = check_masks(masks, images.shape[0], images.shape[-2:]).to(images.device)
        flat = masks.flatten(1)
        skipped = ~(flat.amax(1) > 0) | (flat.amin(1) >= 1)  # all-false or all-true
        with self._below() as below:
            logits, maps, saliency = self._maps(images, classes)
        classification = self.criterion(logits, targets)
        per_image = type(self)._term(maps, masks, reduction="none")
        kept = (~skipped).to(per_image.dtype)
        per_image = per_image * kept
        loss, explanation = self._combine(classification, per_image.sum() / kept.sum().clamp_min(1), below)
        return GuidedLossOutput(
            loss=loss,
            classification=classification,
            explanation=explanation,
            logits=logits,
            saliency=saliency.detach(),
            per_image=per_image.detach(),
            skipped=skipped,
        )


_COMMON_ARGS = """
    Args:
        model (torch.nn.Module): the classifier (may be wrapped in ``DistributedDataParallel``).
        layer (torch.nn.Module, optional): the attribution layer (``model.layer4``); ignored
            with an attribution at the input.
        lam (float): weight of the term (1, the authors' command-line default; their paper
            sweeps it per loss).
        attribution (str, optional): a name of
            :data:`~captum_consistency.attr.DIFFERENTIABLE_ATTRIBUTIONS`; default
            ``"gradcam"`` (Rao et al.'s ``GradCam`` at their ``Final`` layer;
            ``"input-x-gradient"`` is their ``IxG`` at ``Input``). A non-differentiable name
            (``"captum:occlusion"``, ``"pgc:scorecam"``) raises a ``ValueError``.
        criterion (Callable, optional): classification loss; cross-entropy by default.
        check_graph (bool): check on the first training step that the term's gradient reaches
            the parameters below the attribution layer.

    Images whose mask is all-false or all-true are skipped (counted in ``num_skipped``); the
    term is the mean over the others (Rao et al. sum over the images of the batch).
"""


class EnergyLoss(_MaskGuidedLoss):
    __doc__ = r"""Energy loss (Rao, Böhle, Parchami-Araghi, Schiele, ICCV 2023): attribution inside the mask.

    "Studying How to Efficiently and Effectively Guide Models with Explanations":

    .. math::

        \mathcal{L} = \ell(f(x), y) + \lambda \Big(1 - \frac{\sum_{ij} M_{ij} a^+_{ij}}
        {\sum_{ij} a^+_{ij}}\Big)

    (:func:`~captum_consistency.losses.energy_loss`). Facts of the official code
    (sukrutrao/Model-Guidance) followed: the attribution is neither clipped nor normalised
    before the loss (which takes its positive part), it is resized bilinearly to the image
    size, and a total below 1e-7 gives ``1 - inside``.
    """ + _COMMON_ARGS + """
    Examples::

        >>> loss_fn = EnergyLoss(model, model.layer4, lam=1.0)
        >>> out = loss_fn(images, labels, masks)      # masks: (N, H, W) bool
        >>> out.loss.backward()
    """
    _term = staticmethod(energy_loss)


class L1MaskLoss(_MaskGuidedLoss):
    __doc__ = r"""L1 distance between the normalised attribution and the mask (Rao et al., ICCV 2023).

    The GRADIA loss (Gao et al., 2022) as compared by Rao et al.:

    .. math::

        \mathcal{L} = \ell(f(x), y) + \frac{\lambda}{HW} \sum_{ij}
        \Big| \frac{a^+_{ij}}{\max |a|} - M_{ij} \Big|

    (:func:`~captum_consistency.losses.l1_mask_loss`). Facts of the official code followed:
    positive part, then division by the per-image maximum, then bilinear resize; mean over
    pixels.
    """ + _COMMON_ARGS + """
    Examples::

        >>> out = L1MaskLoss(model, model.layer4)(images, labels, masks)
    """
    _term = staticmethod(l1_mask_loss)


class PPCELoss(_MaskGuidedLoss):
    __doc__ = r"""Per-pixel cross-entropy inside the mask (PPCE; HAICS, Shen et al. 2021; Rao et al. 2023).

    .. math::

        \mathcal{L} = \ell(f(x), y) - \frac{\lambda}{\sum M} \sum_{ij} M_{ij}
        \log \frac{a^+_{ij}}{\max |a|}

    (:func:`~captum_consistency.losses.ppce_loss`). Facts of the official code followed: the
    same positive part and maximum normalisation as L1, binary cross-entropy against 1 averaged
    over the mask's pixels only (nothing pushes the attribution down outside).
    """ + _COMMON_ARGS + """
    Examples::

        >>> out = PPCELoss(model, model.layer4)(images, labels, masks)
    """
    _term = staticmethod(ppce_loss)


class RRRGradCamLoss(_MaskGuidedLoss):
    __doc__ = r"""RRR on an attribution map, Grad-CAM by default (Rao et al.'s RRR*, ICCV 2023).

    .. math::

        \mathcal{L} = \ell(f(x), y) + \lambda \sum_{ij} (1 - M_{ij})
        \Big(\frac{a_{ij}}{\max |a|}\Big)^2

    (:func:`~captum_consistency.losses.rrr_gradcam_loss`). Facts of the official code followed:
    the signed attribution divided by its per-image maximum magnitude, resized bilinearly,
    squared and summed over the pixels outside the box. Where :class:`RRRLoss` penalises input
    gradients, this penalises the explanation the model is judged by.
    """ + _COMMON_ARGS + """
    Examples::

        >>> out = RRRGradCamLoss(model, model.layer4)(images, labels, masks)
    """
    _term = staticmethod(rrr_gradcam_loss)


class RRRLoss(_MaskGuidedLoss):
    r"""Right for the Right Reasons (Ross, Hughes & Doshi-Velez, IJCAI 2017).

    Input gradients of the summed log-probabilities must vanish outside the mask:

    .. math::

        \mathcal{L} = \ell(f(x), y) + \lambda \sum_{c,i,j} \Big( (1 - M_{ij})
        \frac{\partial}{\partial x_{cij}} \sum_k \log \hat y_k \Big)^2

    (:func:`~captum_consistency.losses.rrr_loss`; Eq. 1 of the paper without its weight-decay
    term, which the optimiser's ``weight_decay`` provides). The explained quantity is the
    paper's (every class's log-probability), so there is no ``attribution`` choice; the
    gradient is taken at the input with ``create_graph=True``. The term is the per-image sum,
    averaged over the batch (the paper sums over the batch).

    Args:
        model (torch.nn.Module): the classifier.
        layer (torch.nn.Module, optional): ignored (the gradient is taken at the input).
        lam (float): weight ``lambda_1`` of the term (the paper picks it so that both terms have
            the same order of magnitude; default 1).
        attribution (str, optional): ``None`` or ``"input-gradient"``; any other name raises a
            ``ValueError`` (use :class:`RRRGradCamLoss` for a penalty on an attribution).
        criterion (Callable, optional): classification loss; cross-entropy by default.
        check_graph (bool): check on the first training step that the term's gradient reaches
            the model's parameters.

    Images whose mask is all-false or all-true are skipped (counted in ``num_skipped``).

    Examples::

        >>> out = RRRLoss(model, lam=10.0)(images, labels, masks)
        >>> out.loss.backward()
    """

    _term = staticmethod(rrr_loss)
    _input_gradients = True

    def _maps(self, images: Tensor, classes: Tensor):
        x = images.detach().requires_grad_()
        logits = self.model(x)
        if logits.dim() != 2:
            raise ValueError(f"the model must return (N, num_classes) logits, got {tuple(logits.shape)}")
        score = torch.log_softmax(logits.float(), dim=1).sum()
        (grads,) = torch.autograd.grad(score, x, create_graph=torch.is_grad_enabled())
        return logits, grads, grads.detach().square().sum(1, keepdim=True)
