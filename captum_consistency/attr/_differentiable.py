"""The attributions a training loss can differentiate, by name: one table, one owner.

An explanation-guided loss puts a penalty on an attribution map and back-propagates it into the
model's parameters, so the map must keep its autograd graph (double backpropagation). Only the
gradient-based methods computed from the training forward pass do; perturbation methods
(occlusion, ScoreCAM, ablation), and anything that goes through numpy (pytorch-grad-cam's CAMs),
return constants. :data:`DIFFERENTIABLE_ATTRIBUTIONS` lists the ones the losses accept; every
entry reuses the library's recorders (:class:`~captum_consistency.LayerRecorder`,
:func:`~captum_consistency.attr.score_gradients`) or Captum's own layer attribution with
``grad_kwargs={"create_graph": True}``.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from captum_consistency.attr._elementwise_grad_cam import elementwise_grad_cam, grad_cam
from captum_consistency.attr._layers import layer_name
from captum_consistency.attr._recording import LayerRecorder, _UnsupportedLayerOutput, score_gradients

__all__ = [
    "AttributionMaps",
    "DIFFERENTIABLE_ATTRIBUTIONS",
    "differentiable_attribution",
    "check_graph_reaches_parameters",
    "ModulesBelow",
]


class AttributionMaps(NamedTuple):
    """What a differentiable attribution of :data:`DIFFERENTIABLE_ATTRIBUTIONS` returns."""

    logits: Tensor  #: ``(N, K)`` the forward pass's logits
    maps: Tensor  #: ``(N, 1, h, w)`` float32 maps, attached to the graph (layer or input size)
    classes: Tensor  #: ``(N,)`` the explained classes (the predicted ones when none were given)


def _classes(logits: Tensor, classes: Optional[Tensor]) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"the model must return (N, num_classes) logits, got {tuple(logits.shape)}")
    return logits.detach().argmax(dim=1) if classes is None else classes


def _graph_error(model: nn.Module, layer: Optional[nn.Module], name: str, cause: BaseException) -> RuntimeError:
    where = "the input" if layer is None else f"layer {layer_name(model, layer) or type(layer).__name__!r}"
    return RuntimeError(
        f"attribution {name!r} cannot keep the autograd graph at {where}: {cause}. The model "
        "detaches or recomputes the layer's output outside autograd (a detaching hook, "
        "torch.no_grad() or numpy inside forward); the explanation term would train nothing"
    )


def _layer_cam(cam: Callable[[Tensor, Tensor, bool], Tensor], name: str):
    def attribution(
        model: nn.Module, layer: Optional[nn.Module], images: Tensor, classes: Optional[Tensor]
    ) -> AttributionMaps:
        if layer is None:
            raise ValueError(f"attribution {name!r} needs a layer (e.g. model.layer4)")
        try:
            with LayerRecorder(layer) as recorder:
                logits = model(images)
            activations = recorder.pop()
            classes = _classes(logits, classes)
            (grads,) = score_gradients(
                logits, activations, classes, create_graph=torch.is_grad_enabled(), retain_graph=True
            )
        except (_UnsupportedLayerOutput, RuntimeError) as e:
            raise _graph_error(model, layer, name, e) from e
        return AttributionMaps(logits, cam(activations, grads, True), classes)

    return attribution


def _input_x_gradient(
    model: nn.Module, layer: Optional[nn.Module], images: Tensor, classes: Optional[Tensor]
) -> AttributionMaps:
    x = images if images.requires_grad else images.detach().requires_grad_()
    logits = model(x)
    classes = _classes(logits, classes)
    try:
        (grads,) = score_gradients(logits, x, classes, create_graph=torch.is_grad_enabled(), retain_graph=True)
    except RuntimeError as e:
        raise _graph_error(model, None, "input-x-gradient", e) from e
    # summed over the colour channels in float32, signed (Rao et al.'s IxG)
    maps = torch.sum(grads * x, dim=1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return AttributionMaps(logits, maps, classes)


def _captum_layer_gxa(
    model: nn.Module, layer: Optional[nn.Module], images: Tensor, classes: Optional[Tensor]
) -> AttributionMaps:
    from captum.attr import LayerGradientXActivation

    if layer is None:
        raise ValueError("attribution 'layer-gradient-x-activation' needs a layer (e.g. model.layer3)")
    logits = model(images)
    classes = _classes(logits, classes)
    try:
        attr = LayerGradientXActivation(model, layer).attribute(
            images, target=classes, grad_kwargs={"create_graph": torch.is_grad_enabled()}
        )
    except (AssertionError, RuntimeError) as e:
        raise _graph_error(model, layer, "layer-gradient-x-activation", e) from e
    if not isinstance(attr, Tensor):
        raise _graph_error(model, layer, "layer-gradient-x-activation", TypeError("the layer returns a tuple"))
    maps = attr.sum(dim=1, keepdim=True, dtype=torch.promote_types(attr.dtype, torch.float32))
    return AttributionMaps(logits, maps, classes)


#: name -> ``attribution(model, layer, images, classes) -> AttributionMaps``: the attributions
#: (``classes=None``: the predicted classes)
#: whose maps keep the autograd graph, as the explanation-guided losses need them.
#:
#: - ``"elementwise-gradcam"``: Eq. 3 of Pillai & Pirsiavash, ``relu(sum_k dy/dA_k * A_k)``
#:   (:func:`~captum_consistency.attr.elementwise_grad_cam`), at ``layer``;
#: - ``"gradcam"``: Grad-CAM (:func:`~captum_consistency.attr.grad_cam`), at ``layer``;
#: - ``"input-x-gradient"``: ``sum_c x_c * dy/dx_c`` at the input (signed; ``layer`` ignored);
#: - ``"layer-gradient-x-activation"``: Captum's :class:`~captum.attr.LayerGradientXActivation`
#:   with ``grad_kwargs={"create_graph": True}``, summed over channels (signed), at ``layer``
#:   (an inner layer, e.g. ``layer3``); one extra forward pass, Captum's.
#:
#: The first two come out of one forward pass, the one that gives the logits.
DIFFERENTIABLE_ATTRIBUTIONS: Dict[str, Callable[..., AttributionMaps]] = {
    "elementwise-gradcam": _layer_cam(elementwise_grad_cam, "elementwise-gradcam"),
    "gradcam": _layer_cam(grad_cam, "gradcam"),
    "input-x-gradient": _input_x_gradient,
    "layer-gradient-x-activation": _captum_layer_gxa,
}

#: Attributions at the input: the loss's ``layer`` is not used.
INPUT_ATTRIBUTIONS = ("input-x-gradient",)


def differentiable_attribution(name: str) -> Callable[..., AttributionMaps]:
    """The differentiable attribution called ``name`` (:data:`DIFFERENTIABLE_ATTRIBUTIONS`).

    Args:
        name (str): one of the table's names (``_`` and ``-`` are interchangeable).

    Returns:
        Callable: ``attribution(model, layer, images, classes) -> AttributionMaps``.

    Raises:
        ValueError: ``name`` is not differentiable: a registry name of
            :func:`~captum_consistency.attr.get_attribution` (``"captum:occlusion"``,
            ``"pgc:scorecam"``, ``"cmwp"`` ...: perturbations, numpy, or modified backward
            rules without a double backward) or an unknown one.

    Examples::

        >>> cam = differentiable_attribution("elementwise-gradcam")
        >>> logits, maps = cam(model, model.layer4, images, labels)  # maps keep the graph
    """
    if not isinstance(name, str):
        raise TypeError(f"attribution must be a name (str), got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key in DIFFERENTIABLE_ATTRIBUTIONS:
        return DIFFERENTIABLE_ATTRIBUTIONS[key]
    known = ", ".join(DIFFERENTIABLE_ATTRIBUTIONS)
    if ":" in key or key in ("cmwp", "fullgrad"):
        raise ValueError(
            f"attribution {name!r} is not differentiable: a training loss needs a map that keeps "
            "the autograd graph, and perturbation methods, pytorch-grad-cam's CAMs (numpy) and "
            f"the modified-backward methods of the evaluation registry do not. Use one of: {known}"
        )
    raise ValueError(f"unknown attribution {name!r}; the differentiable ones are: {known}")


class ModulesBelow:
    """Context manager recording which modules of ``model`` ran before ``layer`` started.

    Used once, on a loss's first training step: the parameters it returns are those below
    the attribution layer (of the modules that finished before it started: not the layer's
    own, nor its children's), whose gradient the explanation term must reach. With
    ``layer=None`` (an attribution at the input) every module that ran counts.

    Examples::

        >>> with ModulesBelow(model, model.layer4) as below:
        ...     logits = model(x)
        >>> params = below.parameters()
    """

    def __init__(self, model: nn.Module, layer: Optional[nn.Module]) -> None:
        self.model, self.layer = model, layer
        self._order: list = []
        self._layer_start: Optional[int] = None
        self._handles: list = []

    def _hook(self, module: nn.Module, inputs, output) -> None:
        self._order.append(module)

    def _pre_hook(self, module: nn.Module, inputs) -> None:
        if self._layer_start is None:
            self._layer_start = len(self._order)

    def __enter__(self) -> "ModulesBelow":
        self._handles = [m.register_forward_hook(self._hook) for m in self.model.modules()]
        if self.layer is not None:
            self._handles.append(self.layer.register_forward_pre_hook(self._pre_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def parameters(self) -> list:
        """The parameters (requiring grad) of the modules that finished before the layer started."""
        end = len(self._order) if self.layer is None else (self._layer_start or 0)
        seen, params = set(), []
        for module in self._order[:end]:
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params


def check_graph_reaches_parameters(
    term: Tensor, parameters: Sequence[nn.Parameter], where: str
) -> None:
    """Raises unless ``term``'s gradient reaches some of ``parameters``.

    The check a loss runs on its first training step: an explanation term whose graph stops at
    the attribution layer (a detaching hook, a recomputation outside autograd) would train
    nothing while the loss still decreases through the classification term. A gradient that is
    connected but zero (an all-zero map early in training) passes.

    Args:
        term (Tensor): the scalar explanation term (its graph is retained).
        parameters (sequence of Parameter): the parameters below the attribution layer
            (:class:`ModulesBelow`); an empty sequence (a frozen backbone) passes.
        where (str): the layer, for the message.

    Raises:
        RuntimeError: the term's graph reaches none of those parameters.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = None
    if term.requires_grad:
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    if grads is None or all(g is None for g in grads):
        raise RuntimeError(
            f"the explanation term's gradient does not reach the {len(params)} parameter "
            f"tensor(s) below {where}: its graph is cut there (a detaching hook, a numpy "
            "round trip, torch.no_grad() inside forward), so it would train nothing"
        )
