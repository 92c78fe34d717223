"""Adapters that turn Captum's and pytorch-grad-cam's attributions into saliency maps.

A saliency map here is a non-negative ``(N, 1, h, w)`` float tensor, the input of
:mod:`captum_consistency.metrics`. Captum's attributions are signed and have one value per input
channel; pytorch-grad-cam's CAMs are NumPy arrays ``(N, H, W)``. The two adapters below call the
libraries unchanged and apply one documented reduction, so that every method of the registry
(:func:`captum_consistency.attr.get_attribution`) can be scored by the same metrics.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from captum.attr._utils.attribution import Attribution
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from captum_consistency._warnings import CaptumConsistencyWarning

__all__ = [
    "CaptumAttribution",
    "PytorchGradCamAttribution",
    "REDUCTIONS",
    "vit_reshape_transform",
]


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

    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor,
        target: Any = None,
        additional_forward_args: Optional[object] = None,
    ) -> Tensor:
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


def vit_reshape_transform(tensor: Tensor, height: Optional[int] = None, width: Optional[int] = None) -> Tensor:
    r"""ViT tokens ``(N, 1 + h w, C)`` -> feature map ``(N, C, h, w)``, the class token dropped.

    pytorch-grad-cam's ``reshape_transform`` convention for vision transformers (its
    ``vit_reshape_transform``): the patch tokens, in raster order, are the map. ``height`` and
    ``width`` default to the square grid of the token count (torchvision's
    ``VisionTransformer`` takes square images only).

    Args:
        tensor (Tensor): ``(N, 1 + h * w, C)`` tokens, the class token first.
        height (int, optional): rows of the patch grid.
        width (int, optional): columns of the patch grid.

    Returns:
        Tensor ``(N, C, h, w)``.

    Raises:
        ValueError: a tensor that is not ``(N, T, C)`` or whose ``T - 1`` patch tokens do not
            form the grid.

    Examples::

        >>> vit_reshape_transform(torch.zeros(2, 1 + 14 * 14, 768)).shape
        torch.Size([2, 768, 14, 14])
    """
    if not isinstance(tensor, Tensor) or tensor.dim() != 3:
        raise ValueError(f"ViT tokens must be (N, 1 + h*w, C), got {getattr(tensor, 'shape', tensor)}")
    patches = tensor.shape[1] - 1
    if height is None or width is None:
        side = math.isqrt(max(patches, 0))
        height, width = height or side, width or side
    if height * width != patches:
        raise ValueError(
            f"{patches} patch tokens (one class token dropped) do not form a {height}x{width} grid"
        )
    from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform as _library

    return _library(tensor, height=height, width=width)


class PytorchGradCamAttribution(Attribution):
    r"""A pytorch-grad-cam CAM as a saliency map ``(N, 1, H, W)`` at input resolution.

    Calls ``cam_class(model, [layer], reshape_transform=...)`` and then the CAM object on the
    inputs with ``ClassifierOutputTarget(t)`` per sample, exactly as pytorch-grad-cam's README
    does, and returns its array as a tensor with a channel dimension. The values are
    pytorch-grad-cam's own post-processing (``BaseCAM.compute_cam_per_layer`` and
    ``scale_cam_image``): the CAM at the layer's resolution, ReLU'd, min-max scaled per image to
    ``[0, 1]`` and resized to the input with OpenCV's bilinear ``cv2.resize``. The adapter adds
    no computation of its own; it only

    * builds a new CAM object per call and releases its hooks afterwards (pytorch-grad-cam
      keeps forward hooks on the layer for the object's lifetime otherwise);
    * restores what the library changes on the model: the training flags (``BaseCAM`` calls
      ``model.eval()``), the parameters' ``.grad`` (it calls ``model.zero_grad()`` and
      ``backward()``), and, for AblationCAM, the layer it swaps for its ablation layer;
    * runs ``images_per_call`` images per CAM call: ScoreCAM builds all ``K`` masked copies of
      every image of the call at once (``N * K * C * H * W`` floats: about 5 GB for 16 images
      at 224 px with ResNet-18's 512 channels), so it runs one image per call by default. Each
      image's map depends on that image only, so the result does not depend on the split.

    Args:
        model (torch.nn.Module): the classifier, returning ``(N, num_classes)``.
        layer (torch.nn.Module): the target layer.
        cam_class (type): a pytorch-grad-cam ``BaseCAM`` subclass, e.g. ``GradCAM``.
        reshape_transform (Callable, optional): pytorch-grad-cam's ``reshape_transform``
            (``(N, T, C)`` tokens -> ``(N, C, h, w)``), e.g. :func:`vit_reshape_transform`.
        batch_size (int, optional): masked or ablated images per forward pass (ScoreCAM: 16,
            AblationCAM: 32 by default, the library's defaults); lower it to save memory.
        images_per_call (int, optional): images per CAM call; ``None``: all (ScoreCAM: 1).
        cam_kwargs (dict, optional): further constructor arguments (AblationCAM's
            ``ratio_channels_to_ablate``).
        call_kwargs (dict, optional): arguments of the CAM call (``aug_smooth``,
            ``eigen_smooth``).

    Examples::

        >>> from pytorch_grad_cam import GradCAMPlusPlus
        >>> cam = PytorchGradCamAttribution(model, model.layer4, GradCAMPlusPlus)
        >>> cam.attribute(images, target=labels).shape       # (N, 1, H, W) in [0, 1]
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        cam_class: type,
        reshape_transform: Optional[Callable[[Tensor], Tensor]] = None,
        batch_size: Optional[int] = None,
        images_per_call: Optional[int] = None,
        cam_kwargs: Optional[Dict[str, Any]] = None,
        call_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        from pytorch_grad_cam import ScoreCAM
        from pytorch_grad_cam.base_cam import BaseCAM

        if not (isinstance(cam_class, type) and issubclass(cam_class, BaseCAM)):
            raise TypeError(f"cam_class must be a pytorch-grad-cam BaseCAM subclass, got {cam_class!r}")
        for argname, value in (("batch_size", batch_size), ("images_per_call", images_per_call)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{argname} must be a positive int, got {value!r}")
        Attribution.__init__(self, model)
        self.model = model
        self.layer = layer
        self.cam_class = cam_class
        self.reshape_transform = reshape_transform
        self.batch_size = batch_size
        if images_per_call is None and issubclass(cam_class, ScoreCAM):
            images_per_call = 1
        self.images_per_call = images_per_call
        self.cam_kwargs = dict(cam_kwargs or {})
        self.call_kwargs = dict(call_kwargs or {})

    def _new_cam(self):
        from pytorch_grad_cam import AblationCAM, ScoreCAM
        from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit

        kwargs = dict(self.cam_kwargs)
        if issubclass(self.cam_class, AblationCAM):
            # A new ablation layer per object: the library's default argument is one shared
            # instance, which keeps the state of the last call.
            kwargs.setdefault(
                "ablation_layer", AblationLayerVit() if self.reshape_transform else AblationLayer()
            )
            if self.batch_size is not None:
                kwargs["batch_size"] = self.batch_size
        cam = self.cam_class(self.model, [self.layer], reshape_transform=self.reshape_transform, **kwargs)
        if issubclass(self.cam_class, ScoreCAM) and self.batch_size is not None:
            cam.batch_size = self.batch_size  # read by ScoreCAM.get_cam_weights
        return cam

    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor,
        target: Any = None,
        additional_forward_args: Optional[object] = None,
    ) -> Tensor:
        r"""pytorch-grad-cam's map of ``target`` for ``inputs``.

        Args:
            inputs (Tensor): ``(N, C, H, W)`` images.
            target (int, sequence of int or Tensor, optional): class per sample or one for all;
                ``None``: the predicted class (pytorch-grad-cam's default).
            additional_forward_args: not supported (pytorch-grad-cam calls ``model(inputs)``).

        Returns:
            Tensor ``(N, 1, H, W)`` float32 in ``[0, 1]`` on ``inputs.device`` (NaN where the
            library returned NaN).

        Raises:
            ValueError: ``additional_forward_args`` given, or inputs that are not images.
        """
        from pytorch_grad_cam.utils.find_layers import replace_layer_recursive
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if additional_forward_args is not None:
            raise ValueError(
                "pytorch-grad-cam calls model(inputs) only: additional_forward_args are not "
                "supported by the pgc: methods"
            )
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            raise ValueError(f"inputs must be (N, C, H, W) images, got {getattr(inputs, 'shape', inputs)}")
        n = inputs.shape[0]
        classes: Optional[List[int]] = None
        if target is not None:
            t = torch.as_tensor(target).reshape(-1)
            classes = [int(c) for c in (t.expand(n) if t.numel() == 1 else t).tolist()]
            if len(classes) != n:
                raise ValueError(f"target has {len(classes)} entries for a batch of {n}")
        step = self.images_per_call or max(n, 1)
        training = {m: m.training for m in self.model.modules()}
        grads = [(p, p.grad) for p in self.model.parameters()]
        maps = []
        try:
            with torch.enable_grad():
                for start in range(0, n, step):
                    chunk = inputs[start:start + step].detach()
                    targets = None if classes is None else [
                        ClassifierOutputTarget(c) for c in classes[start:start + step]
                    ]
                    cam = self._new_cam()
                    try:
                        out = cam(chunk, targets, **self.call_kwargs)
                    finally:
                        cam.activations_and_grads.release()
                        ablation = getattr(cam, "ablation_layer", None)
                        if ablation is not None and any(m is ablation for m in self.model.modules()):
                            replace_layer_recursive(self.model, ablation, self.layer)
                    maps.append(torch.from_numpy(out).float())
        finally:
            for module, flag in training.items():
                module.training = flag
            for p, g in grads:
                p.grad = g
        if not maps:
            return inputs.new_zeros((0, 1) + tuple(inputs.shape[-2:]))
        return torch.cat(maps).unsqueeze(1).to(inputs.device)


# ----------------------------------------------------------------------------------------------
# Checks for methods whose rule applies to some module types only.

#: Element-wise non-linearities (function names as torch dispatches them) whose backward a
#: modified-gradient rule (guided backprop, DeepLift) must replace.
_ACTIVATIONS = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid",
    "hardsigmoid_", "hardtanh", "hardtanh_", "elu", "elu_", "leaky_relu", "leaky_relu_", "mish",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus", "softmax", "log_softmax",
})
#: DeepLift also needs its own rule for normalisations by data statistics and max pooling.
_DEEPLIFT_EXTRA = frozenset({
    "layer_norm", "group_norm", "instance_norm", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
})


class _CallCounter(TorchFunctionMode):
    def __init__(self, names: frozenset) -> None:
        super().__init__()
        self.names = names
        self.depth = 0
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.depth == 0 and name in self.names:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def unhandled_nonlinearities(
    model: nn.Module,
    example: Tensor,
    handled: Tuple[Type[nn.Module], ...],
    names: frozenset = _ACTIVATIONS,
    additional_forward_args: Optional[object] = None,
) -> Counter:
    """Non-linear functions called outside modules of the ``handled`` types in one forward pass.

    A modified-gradient rule installed on module types (Captum's guided backprop on
    ``nn.ReLU``, DeepLift on its ``SUPPORTED_NON_LINEAR``) leaves every other non-linearity with
    its ordinary gradient: ``nn.GELU`` in ConvNeXt and ViT, ``nn.SiLU`` in EfficientNet, the
    functional ``F.relu`` of ``DenseNet.forward``. They are found by running ``example``
    through the model under a :class:`~torch.overrides.TorchFunctionMode`.

    Returns:
        collections.Counter: function name -> number of calls outside handled modules.
    """
    counter = _CallCounter(names)

    def enter(module, args):
        counter.depth += 1

    def leave(module, args, output):
        counter.depth -= 1

    handles = []
    for module in model.modules():
        if isinstance(module, handled):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    extra = additional_forward_args
    extra = () if extra is None else (extra if isinstance(extra, tuple) else (extra,))
    try:
        with torch.no_grad(), counter:
            model(example, *extra)
    finally:
        for h in handles:
            h.remove()
    return counter.calls


def warn_unhandled(method: str, rule: str, handled: Sequence[type], calls: Counter) -> None:
    """Warns that ``calls`` (from :func:`unhandled_nonlinearities`) bypass ``rule``."""
    if not calls:
        return
    listed = ", ".join(f"{name} x{count}" for name, count in sorted(calls.items()))
    types = ", ".join(t.__name__ for t in handled)
    warnings.warn(
        f"{method}: the {rule} replaces the gradient of {types} modules only; these "
        f"non-linearities of the model pass their ordinary gradient: {listed}. The map mixes "
        f"the rule with plain gradients (see the registry's documentation)",
        CaptumConsistencyWarning,
        stacklevel=3,
    )


def with_unique_module_calls(
    model: nn.Module,
    example: Tensor,
    types: Tuple[Type[nn.Module], ...],
    additional_forward_args: Optional[object] = None,
) -> nn.Module:
    """``model``, or a traced copy in which each call of a module of ``types`` has its own module.

    Captum's DeepLift stores a module's input and output on the module, so a module called
    twice (torchvision's ``BasicBlock`` calls ``self.relu`` twice) breaks it. The copy is a
    :func:`torch.fx.symbolic_trace` of the model whose second and later calls of such a module
    use a deep copy of it (these modules have no parameters, so the function is the same and
    the parameters are shared with ``model``).

    Raises:
        ValueError: a module is called more than once and the model cannot be traced.
    """
    counts: Counter = Counter()
    handles = [
        m.register_forward_hook(lambda mod, a, o: counts.update([id(mod)]))
        for m in model.modules() if isinstance(m, types)
    ]
    extra = additional_forward_args
    extra = () if extra is None else (extra if isinstance(extra, tuple) else (extra,))
    try:
        with torch.no_grad():
            model(example, *extra)
    finally:
        for h in handles:
            h.remove()
    reused = {k for k, c in counts.items() if c > 1}
    if not reused:
        return model
    names = {id(m): n for n, m in model.named_modules()}
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 -- any tracing failure gets the explanation below
        raise ValueError(
            f"DeepLift needs every non-linearity module called once; "
            f"{', '.join(sorted(names[k] for k in reused))} of {type(model).__name__} are called "
            f"several times and the model cannot be traced by torch.fx to give each call its own "
            f"module ({type(error).__name__}: {error}); give each call its own module"
        ) from error
    modules = dict(traced.named_modules())
    seen = set()
    for i, node in enumerate(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], types):
            continue
        if node.target in seen:
            name = f"_unique_call_{i}"
            traced.add_submodule(name, copy.deepcopy(modules[node.target]))
            node.target = name
        seen.add(node.target)
    traced.recompile()
    traced.train(model.training)
    return traced


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

