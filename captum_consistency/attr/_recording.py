"""Activations and gradients of a layer: the one primitive behind every Grad-CAM of the package.

The GC loss, the evaluation explainer and :class:`~captum_consistency.attr.LayerElementwiseGradCam`
all need a layer's output ``A`` from the forward pass that produced the logits, and the gradient
``dy/dA`` of class scores. :class:`LayerRecorder` records ``A`` with a forward hook (no second
forward pass), :func:`score_gradients` differentiates the chosen scores, and
:func:`layer_gradients` does both for one forward pass.
"""

from __future__ import annotations

import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from captum_consistency._warnings import CaptumConsistencyWarning

__all__ = ["LayerRecorder", "LayerGradients", "layer_gradients", "score_gradients"]


class _UnsupportedLayerOutput(TypeError):
    """The layer's output cannot be recorded or differentiated: it is not one tensor, the layer
    ran twice from a new leaf, or the forward pass's output does not depend on it."""


class LayerRecorder:
    """Context manager that records the output of ``layer`` during forward passes.

    The GC loss needs the layer's activations of the very forward pass that produced the logits
    (a second forward, as a separate attribution call would do, doubles the cost).

    Args:
        layer (torch.nn.Module): the module whose output is recorded; it must return a single
            tensor and run once per forward pass.
        start_graph (bool): record the autograd graph from the layer on only: the layer's output
            is replaced by a copy of a new leaf that requires grad (the recorded tensor) and
            gradient recording is switched on, so a forward pass run under ``torch.no_grad()``
            keeps no graph below the layer. The copy lets the model modify the output in place
            (an in-place ReLU) without touching the recorded activations.
        require_grad (bool): when gradients are recorded and the layer's output does not
            require grad (every parameter below it frozen, inputs that do not require grad),
            replace it by a detached copy that does, so that the gradient of the scores with
            respect to it exists (a frozen backbone's Grad-CAM); nothing below the layer has a
            gradient to lose.

    Attributes:
        replicate (Tensor, optional): when set, the layer's output is replaced by
            ``output.index_select(0, replicate)`` (the GC loss's shared composites: one copy of
            a composite's activations per image it holds); that is what gets recorded.

    Examples::

        >>> with LayerRecorder(model.layer4) as rec:
        ...     logits = model(x)
        >>> acts = rec.pop()
    """

    def __init__(self, layer: nn.Module, start_graph: bool = False, require_grad: bool = False) -> None:
        self.layer = layer
        self.start_graph = start_graph
        self.require_grad = require_grad
        self.replicate: Optional[Tensor] = None
        self._outputs: List[Tensor] = []
        self._handle = None

    def _hook(self, module: nn.Module, inputs, output) -> Optional[Tensor]:
        if not isinstance(output, Tensor):
            raise _UnsupportedLayerOutput(
                f"layer {type(module).__name__} must return a single tensor, got {type(output).__name__}"
            )
        if self.start_graph:
            if self._outputs:
                raise _UnsupportedLayerOutput("the layer ran twice in one forward pass")
            leaf = output.detach().requires_grad_()
            self._outputs.append(leaf)
            torch.set_grad_enabled(True)  # the rest of the forward pass is recorded
            return leaf.clone()  # a forward hook's return value replaces the layer's output
        replaced = False
        if self.require_grad and torch.is_grad_enabled() and not output.requires_grad:
            output, replaced = output.detach().requires_grad_(), True
        if self.replicate is not None:
            output, replaced = output.index_select(0, self.replicate), True
        self._outputs.append(output)
        return output if replaced else None

    def __enter__(self) -> "LayerRecorder":
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def clear(self) -> None:
        """Forgets what was recorded (e.g. before running a failed forward pass again)."""
        self._outputs = []

    def pop(self) -> Tensor:
        """Returns the single recorded output and clears the record.

        Returns:
            Tensor: the layer's output, still attached to the autograd graph.

        Raises:
            RuntimeError: the layer ran zero or several times since the last :meth:`pop`.
        """
        outputs, self._outputs = self._outputs, []
        if len(outputs) != 1:
            raise RuntimeError(
                f"expected the layer to run exactly once per forward pass, it ran {len(outputs)} "
                "times (a layer reused inside the model, or nn.DataParallel replicas: use "
                "DistributedDataParallel)"
            )
        return outputs[0]


def score_gradients(
    outputs: Union[Tensor, Sequence[Tensor]],
    activations: Union[Tensor, Sequence[Tensor]],
    classes: Optional[Tensor] = None,
    rows: Optional[Tensor] = None,
    create_graph: bool = False,
    retain_graph: Optional[bool] = None,
) -> Tuple[Tensor, ...]:
    r"""Gradients of the summed class scores with respect to recorded activations.

    The score is :math:`\sum_o \sum_p y^{(o)}_{r_p, c_p}` over the ``outputs`` ``y^(o)``: with
    ``classes`` ``(P,)`` and ``rows`` ``(P,)`` the entries ``output[rows[p], classes[p]]``;
    without ``rows``, ``rows = 0..N-1`` (one class per row); without ``classes``, every entry
    (outputs already reduced to the explained scores, as Captum's ``_run_forward`` returns
    them). Each sample's gradient is that of its own score as long as the samples do not
    interact after the layer (no batch-norm in training mode there).

    Args:
        outputs (Tensor or sequence of Tensor): ``(N, num_classes)`` logits, or ``(N,)`` scores.
        activations (Tensor or sequence of Tensor): the layer outputs to differentiate with
            respect to (recorded by :class:`LayerRecorder`).
        classes (Tensor, optional): ``(P,)`` class of each score.
        rows (Tensor, optional): ``(P,)`` row of each score.
        create_graph (bool): keep the graph of the gradient (double backpropagation, for a loss
            on the map).
        retain_graph (bool, optional): keep the forward graph (``torch.autograd.grad``'s
            default: ``create_graph``).

    Returns:
        tuple of Tensor: one gradient per activation, shaped like it.

    Examples::

        >>> with LayerRecorder(model.layer4) as rec:
        ...     logits = model(x)
        >>> (grads,) = score_gradients(logits, rec.pop(), classes=labels)
    """
    if isinstance(outputs, Tensor):
        outputs = (outputs,)
    if isinstance(activations, Tensor):
        activations = (activations,)
    scores = []
    for output in outputs:
        if classes is None:
            scores.append(output.sum())
        elif rows is None:
            scores.append(output.gather(1, classes.view(-1, 1)).sum())
        else:
            scores.append(output[rows, classes].sum())
    score = scores[0]
    for other in scores[1:]:
        score = score + other
    return torch.autograd.grad(
        score, tuple(activations), create_graph=create_graph, retain_graph=retain_graph
    )


class LayerGradients(NamedTuple):
    """What :func:`layer_gradients` returns."""

    output: Tensor  #: the forward pass's output
    activations: Tensor  #: the layer's output ``A``
    gradients: Tensor  #: ``dy/dA`` of the chosen scores


def layer_gradients(
    forward: Callable[[], Tensor],
    layer: nn.Module,
    classes: Optional[Tensor] = None,
    create_graph: bool = False,
    start_graph: bool = False,
) -> LayerGradients:
    """Runs ``forward()`` once, recording ``layer``'s output ``A``, and returns ``A`` and ``dy/dA``.

    Args:
        forward (Callable): runs the model, e.g. ``lambda: model(x)``; returns ``(N, K)`` logits
            (or ``(N,)`` scores when ``classes`` is ``None``).
        layer (torch.nn.Module): the layer, run once by ``forward``.
        classes (Tensor, optional): ``(N,)`` class of each row (see :func:`score_gradients`).
        create_graph (bool): differentiable gradients (double backpropagation).
        start_graph (bool): see :class:`LayerRecorder`; run ``forward`` under
            ``torch.no_grad()`` to skip the graph below the layer.

    Returns:
        LayerGradients: ``(output, activations, gradients)``.

    Raises:
        TypeError: the layer returned something other than one tensor, did not run, ran twice
            with ``start_graph``, or the output does not depend on it.
        RuntimeError: the layer ran several times.

    Examples::

        >>> out = layer_gradients(lambda: model(x), model.layer4, classes=labels)
        >>> cam = elementwise_grad_cam(out.activations, out.gradients)
    """
    with LayerRecorder(layer, start_graph=start_graph) as recorder:
        output = forward()
    if not recorder._outputs or not isinstance(output, Tensor) or not output.requires_grad:
        raise _UnsupportedLayerOutput(
            "the layer did not run, or the output does not depend on its output"
        )
    activations = recorder.pop()
    (gradients,) = score_gradients(output, activations, classes, create_graph=create_graph)
    return LayerGradients(output, activations, gradients)


def _zero_non_finite_maps(maps: Tensor, who: str, source: str = "", stacklevel: int = 3) -> Tensor:
    """Replaces the maps that hold NaN or infinity by all-zero maps, with one warning (the
    metrics skip and count all-zero maps)."""
    if maps.dim() == 0 or maps.shape[0] == 0:
        return maps
    finite = torch.isfinite(maps).flatten(1).all(1)
    if bool(finite.all()):
        return maps
    bad = int((~finite).sum())
    warnings.warn(
        f"{who}: {bad} of {maps.shape[0]} maps are not finite (NaN or infinity{source}); they are "
        "returned as all-zero maps, which the metrics skip and count",
        CaptumConsistencyWarning,
        stacklevel=stacklevel,
    )
    shape = (-1,) + (1,) * (maps.dim() - 1)
    return torch.where(finite.view(shape), maps, torch.zeros((), device=maps.device, dtype=maps.dtype))
