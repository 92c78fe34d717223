"""The registry's configured method: one call, ``attribute(inputs, target)``, for every library.

:class:`SaliencyMethod` validates the targets, keeps the peer libraries' per-call notices out of
the way, replaces non-finite maps and upsamples layer maps;
:func:`~captum_consistency.attr.get_attribution` builds it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from captum._utils.gradient import _forward_layer_eval
from captum.attr import LayerAttribution
from torch import Tensor, nn

from captum_consistency.attr._layers import _target_tensor
from captum_consistency.attr._methods import _SPECS
from captum_consistency._modes import eval_mode
from captum_consistency.attr._recording import _zero_non_finite_maps

__all__ = ["SaliencyMethod"]

# Messages Captum emits on every call of these methods; they carry no information here.
_CAPTUM_NOISE = (
    r"Setting backward hooks on ReLU activations",
    r"Input Tensor \d+ did not already require gradients",
    r"Setting forward, backward hooks and attributes on non-linear",
)


@dataclass
class SaliencyMethod:
    r"""A configured saliency method with the uniform call ``attribute(inputs, target)``.

    Attributes:
        name (str): the registry name (e.g. ``"gradcam"``, ``"captum:integrated-gradients"``,
            ``"pgc:gradcam++"``).
        arch (str, optional): the architecture family whose defaults were used (``None`` for
            a model of no known family).
        model (torch.nn.Module): the model.
        method: the object that computes the map: ``ContrastiveExcitationBackprop`` or
            ``FullGrad`` for ``cmwp`` and ``fullgrad``, a
            :class:`~captum_consistency.attr.CaptumAttribution` around the Captum object
            (``.method``) for ``gradcam``, ``elementwise-gradcam`` and ``captum:*``, a
            :class:`~captum_consistency.attr.PytorchGradCamAttribution` for ``pgc:*``.
        layers (dict[str, str]): the layers it uses, by role.
        num_classes (int, optional): the classifier's output size, used to validate targets.
        rule (str): how the attribution is made a non-negative map.

    Examples::

        >>> cmwp = get_attribution("cmwp", torchvision.models.resnet50().eval())
        >>> cmwp.layers
        {'layer': 'layer3', 'contrast_layer': 'avgpool', 'classifier_layer': 'fc'}
        >>> saliency = cmwp(images, target=labels)  # (N, 1, H, W), same as .attribute
        >>> cmwp(images, target=labels, upsample=False).shape  # (N, 1, 14, 14) at layer3
    """

    name: str
    arch: Optional[str]
    model: nn.Module
    method: Any
    layers: Dict[str, str]
    num_classes: Optional[int]
    rule: str = ""
    _prepare: Optional[Callable[[Tensor, Optional[object]], None]] = field(default=None, repr=False)
    _layer: Optional[nn.Module] = field(default=None, repr=False)  # maps at its resolution
    _output_checked: bool = field(default=False, repr=False)

    def attribute(
        self,
        inputs: Tensor,
        target: Union[None, int, Sequence[int], Tensor] = None,
        additional_forward_args: Optional[object] = None,
        upsample: bool = True,
    ) -> Tensor:
        r"""Non-negative saliency ``(N, 1, H, W)`` of ``target`` for images ``(N, C, H, W)``.

        Maps computed at a layer (Grad-CAM, cMWP, Captum's ``LayerGradCam``) are upsampled
        bilinearly (``align_corners=False``, Captum's ``LayerAttribution.interpolate``) to the
        input size; with ``upsample=False`` they keep the layer's resolution, so that a caller
        that resizes them to another size (the evaluation, to the original image size)
        interpolates once. A sample whose map holds NaN or infinity (a peer library's failure,
        e.g. a 0/0 in a normalisation) is returned as an all-zero map, which the metrics skip
        and count, with a warning. A model in training mode is attributed in eval mode and
        given back in its own mode (each submodule's): an attribution never updates the
        batch-norm statistics, and an image's map does not depend on its batch mates.

        Args:
            inputs (Tensor): ``(N, C, H, W)`` images, normalised as the model expects.
            target (int, sequence of int or Tensor, optional): class per sample or one for all;
                ``None``: the predicted class.
            additional_forward_args (Any, optional): extra arguments for the model (not for
                the ``pgc:`` methods).
            upsample (bool): resize layer-resolution maps to the input size.

        Returns:
            Tensor ``(N, 1, H, W)`` (or the layer's ``h, w``), float32, detached, ``>= 0``;
            empty maps ``(0, 1, H, W)`` (``(0, 1, h, w)``) for an empty batch.

        Raises:
            ValueError: a target outside ``[0, num_classes)``, inputs that are not images, or
                a layer whose output is not a spatial ``(N, C, H, W)`` map.
            TypeError: inputs that are not floating point (``uint8`` images), or a model whose
                forward returns a tuple or a dict (wrap it to return the logits).
            RuntimeError: a call under ``torch.inference_mode()`` or on its tensors.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            raise ValueError(f"inputs must be a tensor (N, C, H, W), got {getattr(inputs, 'shape', inputs)!r}")
        if not inputs.is_floating_point():
            raise TypeError(
                f"inputs must be floating-point images, got {inputs.dtype}: convert and normalise "
                "them as the model expects (e.g. images.float() / 255, then the mean and std)"
            )
        if torch.is_inference_mode_enabled() or inputs.is_inference():
            raise RuntimeError(
                f"{self.name} needs gradients, which torch.inference_mode() turns off for good "
                "(its tensors cannot be differentiated later): call attribute outside "
                "torch.inference_mode() with tensors made outside it (torch.no_grad() is fine)"
            )
        with eval_mode(self.model):
            return self._attribute(inputs, target, additional_forward_args, upsample)

    def _check_model_output(self, inputs: Tensor, additional_forward_args: Optional[object]) -> None:
        """Once: the model returns one logits tensor and the map's layer a spatial map."""
        recorded = []
        handle = None
        if self._layer is not None and self.name != "cmwp":
            handle = self._layer.register_forward_hook(lambda m, i, o: recorded.append(o))
        try:
            with torch.no_grad():
                out = self.model(inputs[:1], *_as_tuple(additional_forward_args))
        except Exception:  # noqa: BLE001 - the method's own call reports it, with its message
            return
        finally:
            if handle is not None:
                handle.remove()
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the model returned a {type(out).__name__}, not a (N, num_classes) logits tensor: "
                "wrap it in a module whose forward returns the logits (e.g. out[0] or out['logits'])"
            )
        if recorded and not (isinstance(recorded[0], Tensor) and recorded[0].dim() == 4):
            shape = tuple(recorded[0].shape) if isinstance(recorded[0], Tensor) else type(recorded[0]).__name__
            raise ValueError(
                f"{self.name}: the layer {self.layers.get('layer')!r} must output a spatial "
                f"(N, C, H, W) map, got {shape}: pass a convolutional block (a ResNet's layer4), "
                "not the final Linear or a pooling"
            )
        self._output_checked = True

    def _attribute(
        self,
        inputs: Tensor,
        target: Union[None, int, Sequence[int], Tensor],
        additional_forward_args: Optional[object],
        upsample: bool,
    ) -> Tensor:
        n = inputs.shape[0]
        if n and not self._output_checked:
            self._check_model_output(inputs, additional_forward_args)
        if n == 0:  # several wrapped methods index the first sample
            size = tuple(inputs.shape[-2:])
            if not upsample and self._layer is not None:
                (acts,) = _forward_layer_eval(self.model, inputs, self._layer, additional_forward_args)
                size = tuple(acts.shape[2:])
            return torch.zeros((0, 1) + size, device=inputs.device)
        if target is None and self.name not in ("cmwp", "fullgrad"):
            # Captum needs explicit targets: explain the predicted class (cmwp and fullgrad
            # resolve it themselves)
            with torch.no_grad():
                target = self.model(inputs, *(_as_tuple(additional_forward_args))).argmax(1)
        if target is not None:
            target = _target_tensor(target, n, inputs.device)
            if self.num_classes is not None:
                bad = (target < 0) | (target >= self.num_classes)
                if bool(bad.any()):
                    raise ValueError(
                        f"target {target[bad].tolist()} outside the classifier's range "
                        f"[0, {self.num_classes})"
                    )
        if self._prepare is not None:
            prepare, self._prepare = self._prepare, None
            prepare(inputs[:1], additional_forward_args)
        with torch.enable_grad(), warnings.catch_warnings():
            for message in _CAPTUM_NOISE:
                warnings.filterwarnings("ignore", message=message)
            out = self.method.attribute(inputs, target=target, additional_forward_args=additional_forward_args)
        out = _zero_non_finite_maps(out.detach().float(), self.name,
                                    f" from the {_SPECS[self.name].library} method", stacklevel=4)
        if upsample and tuple(out.shape[-2:]) != tuple(inputs.shape[-2:]):
            out = LayerAttribution.interpolate(out, tuple(inputs.shape[-2:]), "bilinear")
        return out

    __call__ = attribute


def _as_tuple(args: Optional[object]) -> Tuple[Any, ...]:
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)
