"""One registry of saliency methods over captum-consistency, Captum and pytorch-grad-cam.

Every method is configured per torchvision architecture family and called the same way,
``get_attribution(name, model).attribute(images, target)``, returning non-negative
``(N, 1, H, W)`` maps for :mod:`captum_consistency.metrics`. The names, the wrapped classes and
the rule that makes each attribution non-negative are listed in :data:`METHODS` (module
``_methods``) and on the documentation's "Attribution methods" page; the architecture families
and their default layers are in module ``_families``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from captum_consistency.attr._captum_adapter import CaptumAttribution, occlusion_window, smoothgrad_noise
from captum_consistency.attr._elementwise_grad_cam import LayerElementwiseGradCam
from captum_consistency.attr._excitation_backprop import ContrastiveExcitationBackprop
from captum_consistency.attr._layers import layer_name as _layer_name
from captum_consistency.attr._layers import resolve_layer
from captum_consistency.attr._families import (
    ARCHITECTURE_FAMILIES,
    CMWP_FAMILIES,
    _check_family,
    default_layers,
    detect_architecture,
)
from captum_consistency.attr._fullgrad import FullGrad
from captum_consistency.attr._methods import (
    _SPECS,
    METHODS,
    available_attributions,
    canonical_name,
    uses_cam_layer,
)
from captum_consistency.attr._nonlinearities import (
    _ACTIVATIONS,
    _DEEPLIFT_EXTRA,
    unhandled_nonlinearities,
    warn_unhandled,
    with_unique_module_calls,
)
from captum_consistency.attr._pgc_adapter import PytorchGradCamAttribution, vit_reshape_transform
from captum_consistency.attr._saliency_method import SaliencyMethod

__all__ = [
    "get_attribution",
    "available_attributions",
    "canonical_name",
    "uses_cam_layer",
    "default_layers",
    "detect_architecture",
    "SaliencyMethod",
    "METHODS",
    "ARCHITECTURE_FAMILIES",
]


def _resolve_named(model: nn.Module, layer: Union[str, nn.Module], argname: str) -> Tuple[nn.Module, str]:
    """:func:`resolve_layer` (which refuses a module outside the model), and the module's name."""
    module = resolve_layer(model, layer, argname)
    return module, _layer_name(model, module, argname)


def _num_classes(model: nn.Module, arch: Optional[str], classifier: Optional[nn.Module]) -> Optional[int]:
    if classifier is None and arch is not None:
        for module in model.modules():  # the last Linear of a torchvision classifier
            if isinstance(module, nn.Linear):
                classifier = module
    if isinstance(classifier, nn.Linear):
        return classifier.out_features
    if isinstance(classifier, nn.modules.conv._ConvNd):
        return classifier.out_channels
    return None


def _captum_method(key: str, model: nn.Module, layer: Optional[nn.Module]):
    import captum.attr as ca

    if key == "gradcam" or key == "captum:layer-gradcam":
        return ca.LayerGradCam(model, layer)
    if key == "elementwise-gradcam":
        return LayerElementwiseGradCam(model, layer)
    if key == "captum:guided-gradcam":
        return ca.GuidedGradCam(model, layer)
    if key == "captum:smoothgrad":
        return ca.NoiseTunnel(ca.Saliency(model))
    cls = {
        "captum:saliency": ca.Saliency,
        "captum:input-x-gradient": ca.InputXGradient,
        "captum:integrated-gradients": ca.IntegratedGradients,
        "captum:deeplift": ca.DeepLift,
        "captum:guided-backprop": ca.GuidedBackprop,
        "captum:deconvolution": ca.Deconvolution,
        "captum:occlusion": ca.Occlusion,
    }[key]
    return cls(model)


def _captum_options(method: Any) -> List[str]:
    """Keyword arguments of ``method.attribute`` a user may set (NoiseTunnel: and its inner's)."""
    fixed = {"self", "inputs", "target", "additional_forward_args", "return_convergence_delta"}
    functions = [type(method).attribute]
    inner = getattr(method, "attribution_method", None)
    if inner is not None:
        functions.append(type(inner).attribute)
    names: List[str] = []
    for fn in functions:
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed:
                names.append(p.name)
    return names


_PGC_OPTIONS = ("images_per_call", "reshape_transform", "aug_smooth", "eigen_smooth")


def _pgc_options(key: str) -> Tuple[str, ...]:
    if key == "pgc:scorecam":
        return _PGC_OPTIONS + ("batch_size",)
    if key == "pgc:ablationcam":
        return _PGC_OPTIONS + ("batch_size", "ratio_channels_to_ablate")
    return _PGC_OPTIONS


def _check_options(name: str, options: Dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no options"
        raise ValueError(f"{name} does not take option(s) {', '.join(unknown)}; it takes: {takes}")


def get_attribution(
    name: str,
    model: nn.Module,
    *,
    arch: Optional[str] = None,
    layer: Union[None, str, nn.Module] = None,
    contrast_layer: Union[None, str, nn.Module] = None,
    classifier_layer: Union[None, str, nn.Module] = None,
    **options: Any,
) -> SaliencyMethod:
    r"""A saliency method by name, configured for the model's architecture.

    Names (see :data:`METHODS`, :func:`available_attributions` and the documentation's
    "Attribution methods" page for every name, its wrapped class and its non-negativity rule):

    - captum-consistency: ``"gradcam"`` (Captum's :class:`~captum.attr.LayerGradCam`),
      ``"elementwise-gradcam"`` (:class:`~captum_consistency.attr.LayerElementwiseGradCam`, the
      paper's Eq. 3), ``"cmwp"`` (:class:`~captum_consistency.attr.ContrastiveExcitationBackprop`)
      and ``"fullgrad"`` (:class:`~captum_consistency.attr.FullGrad`);
    - ``"captum:<method>"``: Captum's ``saliency``, ``smoothgrad``, ``input-x-gradient``,
      ``integrated-gradients``, ``deeplift``, ``guided-backprop``, ``deconvolution``,
      ``guided-gradcam``, ``layer-gradcam`` and ``occlusion``, through
      :class:`~captum_consistency.attr.CaptumAttribution`;
    - ``"pgc:<cam>"``: pytorch-grad-cam's ``gradcam``, ``hirescam``, ``gradcam-elementwise``,
      ``gradcam++``, ``xgradcam``, ``layercam``, ``eigencam``, ``eigengradcam``, ``scorecam``
      and ``ablationcam``, through :class:`~captum_consistency.attr.PytorchGradCamAttribution`.

    Methods with a layer get the family's default (:func:`default_layers`): ResNet, VGG,
    AlexNet, ConvNeXt, EfficientNet, MobileNetV3, DenseNet, RegNet and, for the ``pgc:``
    methods, ViT (with pytorch-grad-cam's ``reshape_transform`` convention,
    :func:`~captum_consistency.attr.vit_reshape_transform`). Any other model works with an
    explicit ``layer=``; methods without a layer (``captum:saliency``, ``fullgrad`` ...) work
    on any classifier. Put the model in eval mode first.

    Options are the wrapped method's own arguments, with defaults that bound memory to about
    one batch where the library's would not:

    - ``captum:*``: keyword arguments of the Captum class's ``attribute`` (``n_steps``,
      ``baselines``, ``sliding_window_shapes`` ...). Defaults that differ from Captum's:
      ``integrated-gradients`` ``internal_batch_size`` = the batch size; ``smoothgrad``
      ``nt_samples=16``, ``nt_samples_batch_size=1``, ``stdevs`` = 15% of the batch's value
      range; ``occlusion`` a window of 1/7 of the image side over all channels with stride
      1/14 (13 x 13 positions).
    - ``pgc:*``: ``images_per_call`` (images per CAM call; ScoreCAM: 1 by default, as its
      memory grows with images x channels), ``batch_size`` (ScoreCAM, AblationCAM: masked
      images per forward), ``reshape_transform``, ``ratio_channels_to_ablate``
      (AblationCAM), ``aug_smooth``, ``eigen_smooth``.

    Args:
        name (str): a registry name (case-insensitive; ``_`` and ``-`` are interchangeable).
        model (torch.nn.Module): the classifier, returning ``(N, num_classes)``.
        arch (str, optional): one of :data:`ARCHITECTURE_FAMILIES`, for a model with a family's
            module names; ``None``: detected from the model's class.
        layer (str or torch.nn.Module, optional): the CAM layer, or cMWP's saliency layer;
            ignored by methods without a layer.
        contrast_layer (str or torch.nn.Module, optional): cMWP's contrast layer.
        classifier_layer (str or torch.nn.Module, optional): cMWP's classifier layer.
        **options: the method's options (above).

    Returns:
        :class:`SaliencyMethod`.

    Raises:
        ValueError: an unknown name (the message lists the known ones), architecture or
            option; a method that needs a layer on a model of no known family without
            ``layer=``; a layer method other than ``pgc:`` on a ViT; cMWP on a family it has
            no default layers for.

    Examples::

        >>> model = torchvision.models.convnext_tiny(num_classes=80).eval()
        >>> for name in available_attributions():
        ...     sal = get_attribution(name, model).attribute(images, labels)  # (N, 1, H, W)
        >>> ig = get_attribution("captum:integrated-gradients", model, n_steps=32)
        >>> cam = get_attribution("pgc:scorecam", model, batch_size=8)
    """
    key = canonical_name(name)
    spec = _SPECS[key]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if arch is None:
        arch = detect_architecture(model)
    else:
        _check_family(arch)

    classifier = None
    if classifier_layer is not None:
        classifier = resolve_layer(model, classifier_layer, "classifier_layer")
    elif key == "cmwp" and arch in CMWP_FAMILIES:
        classifier = resolve_layer(model, default_layers(model, arch)["classifier_layer"], "classifier_layer")
    num_classes = _num_classes(model, arch, classifier)

    layers: Dict[str, str] = {}
    module: Optional[nn.Module] = None
    if spec.layer == "cam":
        if arch == "vit" and spec.library != "pytorch-grad-cam":
            raise ValueError(
                f"{key} needs a convolutional layer with a (N, C, h, w) output; "
                f"{type(model).__name__} is a vision transformer whose tokens need "
                "pytorch-grad-cam's reshape_transform: use a pgc: method (e.g. pgc:gradcam)"
            )
        if layer is None and arch is None:
            raise ValueError(
                f"{key} needs a target layer and {type(model).__name__} is not a torchvision "
                f"family with a default ({', '.join(ARCHITECTURE_FAMILIES)}): pass layer='<module name>' "
                "(e.g. the last convolutional stage), or arch=... for a model with a family's "
                "module names"
            )
        module, layer_name = _resolve_named(model, default_layers(model, arch)["layer"] if layer is None else layer,
                                            "layer")
        layers = {"layer": layer_name}
    elif spec.layer == "cmwp":
        if arch not in CMWP_FAMILIES and (layer is None or contrast_layer is None or classifier_layer is None):
            family = f"a {arch} model" if arch else f"{type(model).__name__}"
            raise ValueError(
                f"cmwp has default layers for {', '.join(CMWP_FAMILIES)} (the ReLU networks its "
                f"excitation rules cover); for {family} pass layer=, contrast_layer= and "
                "classifier_layer="
            )
        defaults = default_layers(model, arch) if arch in CMWP_FAMILIES else {}
        module, layer_name = _resolve_named(model, layer if layer is not None else defaults.get("saliency_layer"),
                                            "layer")
        contrast, contrast_name = _resolve_named(
            model, contrast_layer if contrast_layer is not None else defaults.get("contrast_layer"),
            "contrast_layer")
        assert classifier is not None
        layers = {"layer": layer_name, "contrast_layer": contrast_name,
                  "classifier_layer": _resolve_named(model, classifier, "classifier_layer")[1]}

    prepare: Optional[Callable[[Tensor, Optional[object]], None]] = None
    if key == "cmwp":
        _check_options(key, options, ())
        method: Any = ContrastiveExcitationBackprop(model, module, contrast, classifier)
    elif key == "fullgrad":
        _check_options(key, options, ())
        method = FullGrad(model)
    elif spec.library == "pytorch-grad-cam":
        import pytorch_grad_cam

        _check_options(key, options, _pgc_options(key))
        reshape = options.pop("reshape_transform", None)
        if reshape is None and arch == "vit":
            grid = getattr(model, "image_size", None), getattr(model, "patch_size", None)
            side = grid[0] // grid[1] if all(isinstance(g, int) for g in grid) else None
            reshape = functools.partial(vit_reshape_transform, height=side, width=side)
        call_kwargs = {k: options.pop(k) for k in ("aug_smooth", "eigen_smooth") if k in options}
        method = PytorchGradCamAttribution(
            model, module, getattr(pytorch_grad_cam, spec.wrapped), reshape_transform=reshape,
            batch_size=options.pop("batch_size", None),
            images_per_call=options.pop("images_per_call", None),
            cam_kwargs=options, call_kwargs=call_kwargs,
        )
    else:
        captum_method = _captum_method(key, model, module)
        _check_options(key, options, _captum_options(captum_method))
        default_kwargs = None
        if key == "captum:occlusion":
            default_kwargs = occlusion_window
        elif key == "captum:smoothgrad":
            default_kwargs = smoothgrad_noise
        elif key == "captum:integrated-gradients":
            default_kwargs = _one_batch
        method = CaptumAttribution(captum_method, spec.reduction, {**spec.defaults, **options}, default_kwargs)
        if key in ("captum:guided-backprop", "captum:deconvolution", "captum:guided-gradcam"):
            prepare = functools.partial(_check_guided, key, model)
        elif key == "captum:deeplift":
            prepare = functools.partial(_prepare_deeplift, key, model, method)
    native = module if (spec.layer == "cmwp" or spec.reduction == "relu") else None
    return SaliencyMethod(key, arch, model, method, layers, num_classes, spec.rule, prepare, native)


def _one_batch(inputs: Tensor) -> Dict[str, Any]:
    # internal_batch_size = N: each of the n_steps forward/backward passes holds one batch.
    return {"internal_batch_size": max(1, inputs.shape[0])}


def _check_guided(key: str, model: nn.Module, example: Tensor, extra: Optional[object]) -> None:
    rule = "deconvolution rule" if key == "captum:deconvolution" else "guided-backprop rule"
    calls = unhandled_nonlinearities(model, example, (nn.ReLU,), _ACTIVATIONS, extra)
    warn_unhandled(key, rule, (nn.ReLU,), calls)


def _prepare_deeplift(key: str, model: nn.Module, method: CaptumAttribution, example: Tensor,
                      extra: Optional[object]) -> None:
    from captum.attr import DeepLift
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    handled = tuple(SUPPORTED_NON_LINEAR)
    calls = unhandled_nonlinearities(model, example, handled, _ACTIVATIONS | _DEEPLIFT_EXTRA, extra)
    warn_unhandled(key, "DeepLift rescale rule", handled, calls)
    unique = with_unique_module_calls(model, example, handled, extra)
    if unique is not model:
        method.method = DeepLift(unique)
        method.forward_func = unique
