"""Captum's attributions as saliency maps: one documented channel reduction per method.

A saliency map here is a non-negative ``(N, 1, h, w)`` float tensor, the input of
:mod:`captum_consistency.metrics`. Captum's attributions are signed and have one value per input
channel; :class:`CaptumAttribution` calls Captum unchanged and applies one reduction of
:data:`REDUCTIONS`, so that every Captum method of the registry
(:func:`captum_consistency.attr.get_attribution`) can be scored by the same metrics. The
input-dependent defaults of two methods (occlusion's window, SmoothGrad's noise) are here too.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from captum.attr._utils.attribution import Attribution
from torch import Tensor

__all__ = ["CaptumAttribution", "REDUCTIONS", "occlusion_window", "smoothgrad_noise"]



def _max_abs(a: Tensor) -> Tensor:
    return a.abs().amax(dim=1, keepdim=True)


def _abs_sum(a: Tensor) -> Tensor:
    return a.sum(dim=1, keepdim=True).abs()


def _relu_mean(a: Tensor) -> Tensor:
    return a.mean(dim=1, keepdim=True).clamp(min=0)


def _relu(a: Tensor) -> Tensor:
    if a.shape[1] != 1:
        raise ValueError(f"reduction 'relu' expects one channel (N, 1, h, w), got {tuple(a.shape)}")
    return a.clamp(min=0)


#: How a Captum attribution ``a`` of shape ``(N, C, h, w)`` becomes one non-negative map:
#: ``"max-abs"`` = ``max_c |a_c|`` (Simonyan et al. 2014; TorchRay's ``gradient_to_saliency``),
#: ``"abs-sum"`` = ``|sum_c a_c|`` (Captum's ``visualize_image_attr`` default: channels summed,
#: then ``sign="absolute_value"``), ``"relu-mean"`` = ``max(0, mean_c a_c)`` (the positive part:
#: occluding the pixel lowers the score) and ``"relu"`` = ``max(0, a)`` for one-channel maps
#: (Grad-CAM's ReLU).
REDUCTIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "max-abs": _max_abs,
    "abs-sum": _abs_sum,
    "relu-mean": _relu_mean,
    "relu": _relu,
}


class CaptumAttribution(Attribution):
    r"""A Captum attribution as a non-negative saliency map ``(N, 1, h, w)``.

    Calls ``method.attribute(inputs, target=target,
    additional_forward_args=additional_forward_args, **attribute_kwargs)`` unchanged and
    applies one of :data:`REDUCTIONS` over the channel dimension:

    .. math::

        \text{max-abs: } \max_c |a_c| \qquad \text{abs-sum: } \Big|\sum_c a_c\Big| \qquad
        \text{relu-mean: } \max\big(0, \tfrac{1}{C}\sum_c a_c\big) \qquad
        \text{relu: } \max(0, a)

    The map keeps the resolution of the attribution (the input's for input attributions, the
    layer's for layer attributions such as ``LayerGradCam``).

    Args:
        method (captum.attr.Attribution): a configured Captum attribution, e.g.
            ``Saliency(model)``, ``IntegratedGradients(model)``, ``LayerGradCam(model, layer)``.
        reduction (str): one of ``"max-abs"``, ``"abs-sum"``, ``"relu-mean"``, ``"relu"``.
        attribute_kwargs (dict, optional): further keyword arguments of ``method.attribute``
            (``n_steps=``, ``baselines=``, ``sliding_window_shapes=`` ...).
        default_kwargs (Callable, optional): ``inputs -> dict`` of keyword arguments that
            depend on the inputs (e.g. an occlusion window relative to the image size); those
            in ``attribute_kwargs`` take precedence.

    Examples::

        >>> from captum.attr import IntegratedGradients
        >>> ig = CaptumAttribution(IntegratedGradients(model), "abs-sum",
        ...                        {"n_steps": 32, "internal_batch_size": 16})
        >>> ig.attribute(images, target=labels).shape      # (N, 1, H, W), >= 0
    """

    def __init__(
        self,
        method: Attribution,
        reduction: str,
        attribute_kwargs: Optional[Dict[str, Any]] = None,
        default_kwargs: Optional[Callable[[Tensor], Dict[str, Any]]] = None,
    ) -> None:
        if not isinstance(method, Attribution):
            raise TypeError(f"method must be a Captum Attribution, got {type(method).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
        Attribution.__init__(self, method.forward_func)
        self.method = method
        self.reduction = reduction
        self.attribute_kwargs = dict(attribute_kwargs or {})
        self.default_kwargs = default_kwargs

    def attribute(self, inputs: Tensor, target: Any = None,  # type: ignore[override]
                  additional_forward_args: Optional[object] = None) -> Tensor:
        r"""The reduced, non-negative map of ``target`` for ``inputs``.

        Args:
            inputs (Tensor): ``(N, C, H, W)`` images.
            target (int, sequence of int or Tensor, optional): class per sample or one for all.
            additional_forward_args (Any, optional): extra arguments for the model.

        Returns:
            Tensor ``(N, 1, h, w)``, ``>= 0`` (NaN where the library returned NaN).
        """
        kwargs = dict(self.default_kwargs(inputs)) if self.default_kwargs is not None else {}
        kwargs.update(self.attribute_kwargs)
        out = self.method.attribute(
            inputs, target=target, additional_forward_args=additional_forward_args, **kwargs
        )
        if isinstance(out, tuple):  # (attributions, delta) or one tensor per input
            out = out[0]
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise ValueError(
                f"{type(self.method).__name__} returned {getattr(out, 'shape', type(out))}; a "
                "saliency map needs a spatial (N, C, h, w) attribution (for a layer method, a "
                "layer with a (N, C, h, w) output)"
            )
        return REDUCTIONS[self.reduction](out.detach().float())


def occlusion_window(inputs: Tensor) -> Dict[str, Any]:
    """Default occlusion: a square of 1/7 of the image side over all channels, stride 1/14.

    32 px with stride 16 at 224 px (13 x 13 positions), 64 px with stride 32 on a 448 px
    composite: the same 169 positions at every size. About 32 occluded images per forward pass
    (``perturbations_per_eval``; occlusion needs no gradients, so this is cheap in memory).
    """
    n, channels, height, width = inputs.shape
    side = max(1, round(min(height, width) / 7))
    stride = max(1, side // 2)
    return {
        "sliding_window_shapes": (channels, side, side),
        "strides": (channels, stride, stride),
        "perturbations_per_eval": max(1, 32 // max(n, 1)),
    }


def smoothgrad_noise(inputs: Tensor) -> Dict[str, Any]:
    """SmoothGrad's default noise: 15% of the batch's value range (Smilkov et al. 2017, 10-20%)."""
    spread = float(inputs.detach().max() - inputs.detach().min()) if inputs.numel() else 1.0
    return {"stdevs": 0.15 * spread if spread > 0 else 0.15}

