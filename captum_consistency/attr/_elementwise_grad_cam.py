"""Element-wise Grad-CAM (Pillai & Pirsiavash, AAAI 2021, Eq. 3), a Captum layer attribution."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _run_forward,
)
from captum._utils.gradient import _forward_layer_eval, compute_layer_gradients_and_eval
from captum._utils.typing import TargetType
from captum.attr._utils.attribution import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor
from torch.nn import Module

from captum_consistency._modes import eval_mode
from captum_consistency.attr._layers import check_layer_in_model
from captum_consistency.attr._recording import (
    _UnsupportedLayerOutput,
    _zero_non_finite_maps,
    layer_gradients,
)

__all__ = ["LayerElementwiseGradCam", "elementwise_grad_cam", "grad_cam", "check_layer_in_model"]


def elementwise_grad_cam(activations: Tensor, gradients: Tensor, relu: bool = True) -> Tensor:
    r"""Element-wise Grad-CAM from a layer's activations and gradients: ``sum_k dy/dA_k * A_k``.

    Args:
        activations (Tensor): ``(N, K, *spatial)`` layer output ``A``.
        gradients (Tensor): ``(N, K, *spatial)`` gradient ``dy_t / dA``.
        relu (bool): apply ``max(0, .)`` as in Eq. 3.

    Returns:
        Tensor ``(N, 1, *spatial)``.

    Examples::

        >>> cam = elementwise_grad_cam(acts, grads)  # (N, 1, h, w)
    """
    # Accumulate over channels in at least float32: under bf16 autocast this keeps the map
    # accurate without casting the full-size activations and gradients first.
    dtype = torch.promote_types(torch.promote_types(gradients.dtype, activations.dtype), torch.float32)
    cam = torch.sum(gradients * activations, dim=1, keepdim=True, dtype=dtype)
    return F.relu(cam) if relu else cam


def grad_cam(activations: Tensor, gradients: Tensor, relu: bool = True) -> Tensor:
    r"""Standard Grad-CAM (Eqs. 1-2): channel weights are the spatial mean of the gradients.

    ``max(0, sum_k alpha_k A_k)`` with ``alpha_k = mean_ij dy/dA_ij^k``; equal to Captum's
    ``LayerGradCam`` given the same activations and gradients.

    Args:
        activations (Tensor): ``(N, K, *spatial)``.
        gradients (Tensor): ``(N, K, *spatial)``.
        relu (bool): apply the final ReLU.

    Returns:
        Tensor ``(N, 1, *spatial)``.

    Examples::

        >>> cam = grad_cam(acts, grads)  # (N, 1, h, w)
    """
    weights = gradients.mean(dim=tuple(range(2, gradients.dim())), keepdim=True)
    return elementwise_grad_cam(activations, weights, relu=relu)


def _check_target(target: TargetType) -> None:
    """Refuses negative and boolean class indices in a Captum-style ``target``.

    Captum selects ``output[:, target]``, where ``-1`` silently means the last class and a
    boolean ``True``/``False`` the classes 1/0. Tuples (indices into a multi-dimensional
    output) and lists of them are checked element by element.
    """
    if target is None:
        return
    if isinstance(target, bool):
        raise TypeError(f"target must be a class index, got the bool {target}")
    if isinstance(target, int):
        if target < 0:
            raise ValueError(f"target must be a class index >= 0, got {target}")
        return
    if isinstance(target, Tensor):
        if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
            raise TypeError(f"target tensor must have an integer dtype, got {target.dtype}")
        if target.numel() and int(target.min()) < 0:
            raise ValueError(f"target must hold class indices >= 0, got {int(target.min())}")
        return
    if isinstance(target, (list, tuple)):
        for t in target:
            _check_target(t)


class LayerElementwiseGradCam(LayerAttribution, GradientAttribution):
    r"""Element-wise Grad-CAM of a layer, differentiable for training with it.

    Element-wise Grad-CAM (Pillai & Pirsiavash, "Explainable Models with Consistent
    Interpretations", AAAI 2021, Eq. 3) keeps the spatial location of the gradient instead of
    averaging it over space as Grad-CAM does:

    .. math::

        \mathrm{gcam}^t_{ij} = \max\Big(0, \sum_k \frac{\partial y^t}{\partial A^k_{ij}}
        A^k_{ij}\Big)

    This is **HiResCAM** (Draelos & Carin, 2020). At the last convolutional layer of a network
    whose head is global average pooling followed by a linear layer (torchvision ResNets at
    ``layer4``), ``dy^t / dA^k_ij = w_tk / (hw)`` does not depend on ``(i, j)``, so it equals
    Grad-CAM there (Captum's :class:`~captum.attr.LayerGradCam`); with global *max* pooling or
    at inner layers the two differ.

    The output is ``(N, 1, *spatial)`` at the layer's resolution; upsample it with
    :meth:`captum.attr.LayerAttribution.interpolate`. As in Captum's ``LayerGradCam``,
    the ReLU is applied only with ``relu_attributions=True``. Passing
    ``grad_kwargs={"create_graph": True}`` keeps the graph of the gradient so that the map is
    differentiable with respect to the inputs and every parameter, second-order terms included
    (the GC loss needs this double backpropagation).

    A plain attribution (no ``create_graph``, inputs that do not require grad) records the
    autograd graph from the layer on only, so it costs about one inference forward pass; for a
    model in eval mode on the CPU that pass runs on a channels-last copy of 4-D inputs
    (oneDNN convolutions are faster so; the values are the same to float rounding).

    Args:
        forward_func (Callable): the model or any function returning ``(N, num_classes)``.
        layer (torch.nn.Module): layer whose output (or input) is ``A``, e.g. ``model.layer4``.
        device_ids (list[int], optional): device ids for a ``DataParallel`` model.

    Examples::

        >>> model = torchvision.models.resnet18().eval()
        >>> cam = LayerElementwiseGradCam(model, model.layer4)
        >>> attr = cam.attribute(images, target=labels, relu_attributions=True)  # (N, 1, 7, 7)
        >>> up = LayerAttribution.interpolate(attr, images.shape[-2:], "bilinear")
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: Module,
        device_ids: Union[None, List[int]] = None,
    ) -> None:
        check_layer_in_model(forward_func, layer)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        grad_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Union[Tensor, Tuple[Tensor, ...]]:
        r"""Computes the element-wise Grad-CAM of ``target`` at the layer.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): model inputs, batch first.
            target (int, tuple, Tensor or list, optional): output indices to explain, in
                Captum's convention (one per sample or one for all).
            additional_forward_args (Any, optional): extra arguments for ``forward_func``.
            attribute_to_layer_input (bool): use the layer's input instead of its output.
            relu_attributions (bool): apply the ReLU of Eq. 3.
            grad_kwargs (dict, optional): passed to ``torch.autograd.grad``; use
                ``{"create_graph": True}`` to differentiate through the map.

        Returns:
            Tensor ``(N, 1, *spatial)`` (or a tuple, one per layer input/output tensor); for an
            empty batch (``N = 0``), empty maps ``(0, 1, *spatial)``. A map that holds NaN or
            infinity (an image with a NaN pixel) is returned all zero, with a warning, as
            :func:`~captum_consistency.attr.get_attribution`'s methods do. A model in training
            mode is run in eval mode and given back in its own mode: the attribution never
            updates batch-norm statistics, and a map does not depend on its batch mates.

        Raises:
            ValueError: a negative class index in ``target`` (``-1`` would explain the last
                class, as Python indexing does).
            TypeError: a boolean ``target``.

        Examples::

            >>> attr = LayerElementwiseGradCam(model, model.layer4).attribute(
            ...     x, target=3, relu_attributions=True)
        """
        with eval_mode(self.forward_func):
            out = self._attribute(inputs, target, additional_forward_args, attribute_to_layer_input,
                                  relu_attributions, grad_kwargs)
        if isinstance(out, tuple):
            return tuple(_zero_non_finite_maps(o, type(self).__name__, stacklevel=4) for o in out)
        return _zero_non_finite_maps(out, type(self).__name__, stacklevel=4)

    def _attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType,
        additional_forward_args: Optional[object],
        attribute_to_layer_input: bool,
        relu_attributions: bool,
        grad_kwargs: Optional[Dict[str, Any]],
    ) -> Union[Tensor, Tuple[Tensor, ...]]:
        inputs = _format_tensor_into_tuples(inputs)
        additional_forward_args = _format_additional_forward_args(additional_forward_args)
        _check_target(target)
        if any(isinstance(x, Tensor) and x.dim() and x.shape[0] == 0 for x in inputs):
            # Nothing to differentiate: the layer's output gives the maps' shape.
            evals = _forward_layer_eval(
                self.forward_func, inputs, cast(Module, self.layer), additional_forward_args,
                device_ids=self.device_ids, attribute_to_layer_input=attribute_to_layer_input,
            )
            empty = tuple(
                elementwise_grad_cam(e, torch.zeros_like(e), relu=relu_attributions) for e in evals
            )
            return _format_output(len(empty) > 1, empty)
        fast = self._cut_graph_layer_eval(
            inputs, target, additional_forward_args, attribute_to_layer_input, grad_kwargs
        )
        if fast is not None:
            acts, grads = fast
            return elementwise_grad_cam(acts, grads, relu=relu_attributions)
        layer_gradients, layer_evals = compute_layer_gradients_and_eval(
            self.forward_func,
            cast(Module, self.layer),
            inputs,
            target,
            additional_forward_args,
            device_ids=self.device_ids,
            attribute_to_layer_input=attribute_to_layer_input,
            grad_kwargs=grad_kwargs,
        )
        cams = tuple(
            elementwise_grad_cam(layer_eval, layer_grad, relu=relu_attributions)
            for layer_grad, layer_eval in zip(layer_gradients, layer_evals)
        )
        return _format_output(len(cams) > 1, cams)

    def _cut_graph_layer_eval(
        self,
        inputs: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        grad_kwargs: Optional[Dict[str, Any]],
    ) -> Optional[Tuple[Tensor, Tensor]]:
        """Layer output and its gradient, recording the autograd graph from the layer on only.

        The map needs ``dy/dA`` and ``A``, nothing below the layer. Captum's generic path
        records the whole forward; here the part below the layer runs under ``no_grad`` and
        recording starts at the layer's output, which makes a plain (non-differentiable)
        attribution cost about one inference forward pass (:func:`layer_gradients` with
        ``start_graph=True``; the model may modify the layer's output in place, it gets a copy).
        Returns ``None`` when the generic path is needed: a differentiable map (``create_graph``
        or inputs that require grad), ``DataParallel`` device ids, the layer's input, or a layer
        output that is not one tensor.
        """
        if (
            self.device_ids is not None
            or attribute_to_layer_input
            or (grad_kwargs and grad_kwargs.get("create_graph"))
            or not torch.is_grad_enabled()
            or any(isinstance(x, Tensor) and x.requires_grad for x in inputs)
        ):
            return None
        layer = cast(Module, self.layer)

        def forward(run_inputs: Tuple[Tensor, ...]) -> Callable[[], Tensor]:
            def run() -> Tensor:
                with torch.no_grad():
                    return _run_forward(self.forward_func, run_inputs, target, additional_forward_args)

            return run

        run_inputs = _channels_last_on_cpu(self.forward_func, inputs)
        try:
            try:
                recorded = layer_gradients(forward(run_inputs), layer, start_graph=True)
            except RuntimeError:
                if run_inputs is inputs:
                    raise
                # e.g. a ``.view`` in the model that needs NCHW-contiguous activations:
                # run the model on the caller's tensors as they are.
                recorded = layer_gradients(forward(inputs), layer, start_graph=True)
        except _UnsupportedLayerOutput:
            return None
        return recorded.activations, recorded.gradients


def _channels_last_on_cpu(forward_func: Callable[..., Tensor], inputs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    """The inputs in channels-last memory format when that speeds up a CPU forward pass.

    oneDNN convolutions on the CPU run faster on channels-last tensors than on NCHW ones, which
    they otherwise reorder at every layer. Only 4-D floating-point CPU tensors that are
    NCHW-contiguous are converted, and only for a model in eval mode (a model in training mode would update its
    batch-norm statistics twice if the forward pass had to be run again). The values are
    unchanged; on accelerators the caller keeps the choice of memory format.
    """
    if isinstance(forward_func, Module) and forward_func.training:
        return inputs
    convert = [
        isinstance(x, Tensor) and x.dim() == 4 and x.device.type == "cpu" and x.is_floating_point()
        and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        for x in inputs
    ]
    if not any(convert):
        return inputs
    return tuple(x.contiguous(memory_format=torch.channels_last) if c else x for x, c in zip(inputs, convert))
