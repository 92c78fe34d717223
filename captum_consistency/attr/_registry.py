"""One registry of saliency methods over captum-consistency, Captum and pytorch-grad-cam.

Every method is configured per torchvision architecture family and called the same way,
``get_attribution(name, model).attribute(images, target)``, returning non-negative
``(N, 1, H, W)`` maps for :mod:`captum_consistency.metrics`. The names, the wrapped classes and
the rule that makes each attribution non-negative are listed in :data:`METHODS` and on the
documentation's "Attribution methods" page.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from captum._utils.gradient import _forward_layer_eval
from captum.attr import LayerAttribution
from torch import Tensor, nn
from torchvision.models import (
    VGG,
    AlexNet,
    ConvNeXt,
    DenseNet,
    EfficientNet,
    MobileNetV3,
    RegNet,
    ResNet,
    VisionTransformer,
)

from captum_consistency._warnings import CaptumConsistencyWarning
from captum_consistency.attr._adapters import (
    _ACTIVATIONS,
    _DEEPLIFT_EXTRA,
    CaptumAttribution,
    PytorchGradCamAttribution,
    occlusion_window,
    smoothgrad_noise,
    unhandled_nonlinearities,
    vit_reshape_transform,
    warn_unhandled,
    with_unique_module_calls,
)
from captum_consistency.attr._elementwise_grad_cam import LayerElementwiseGradCam
from captum_consistency.attr._excitation_backprop import (
    ContrastiveExcitationBackprop,
    _target_tensor,
    resolve_layer,
)
from captum_consistency.attr._fullgrad import FullGrad

__all__ = [
    "get_attribution",
    "available_attributions",
    "default_layers",
    "detect_architecture",
    "SaliencyMethod",
    "METHODS",
    "ARCHITECTURES",
]


@dataclass(frozen=True)
class _Spec:
    library: str  # "captum-consistency", "captum" or "pytorch-grad-cam"
    wrapped: str  # the class that computes it
    layer: Optional[str]  # None, "cam" (a CAM layer) or "cmwp" (cMWP's three layers)
    rule: str  # how its output is made a non-negative map
    reduction: Optional[str] = None  # Captum: the channel reduction (adapters.REDUCTIONS)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # Captum: attribute() defaults


_GRADCAM_RULE = "ReLU of the layer map (Selvaraju et al. 2017, Eq. 2), bilinear upsampling"
_MAX_ABS = "max over channels of |a| (Simonyan et al. 2014; TorchRay's gradient_to_saliency)"
_ABS_SUM = "|sum over channels of a| (Captum visualize_image_attr: channel sum, absolute value)"
_PGC_RULE = (
    "pytorch-grad-cam's own: ReLU of the layer map, per-image min-max scaling to [0, 1], "
    "cv2 bilinear resize to the input"
)

_SPECS: Dict[str, _Spec] = {
    # ------------------------------------------------------------------ captum-consistency
    "gradcam": _Spec("captum-consistency", "captum.attr.LayerGradCam", "cam", _GRADCAM_RULE, "relu",
                     {"relu_attributions": True}),
    "elementwise-gradcam": _Spec(
        "captum-consistency", "captum_consistency.attr.LayerElementwiseGradCam", "cam",
        "ReLU of the layer map (the paper's Eq. 3), bilinear upsampling", "relu",
        {"relu_attributions": True}),
    "cmwp": _Spec("captum-consistency", "captum_consistency.attr.ContrastiveExcitationBackprop",
                  "cmwp", "channel sum of the contrastive signal clamped at 0 (TorchRay), "
                  "bilinear upsampling"),
    "fullgrad": _Spec("captum-consistency", "captum_consistency.attr.FullGrad", None,
                      "|.| of every term, rescaled to [0, 1] per term (the authors' psi), summed"),
    # ------------------------------------------------------------------ Captum
    "captum:saliency": _Spec("captum", "captum.attr.Saliency", None, _MAX_ABS, "max-abs",
                             {"abs": True}),
    "captum:smoothgrad": _Spec(
        "captum", "captum.attr.NoiseTunnel(Saliency)", None,
        "mean of the raw gradients over noisy copies, then " + _MAX_ABS, "max-abs",
        {"nt_type": "smoothgrad", "nt_samples": 16, "nt_samples_batch_size": 1, "abs": False}),
    "captum:input-x-gradient": _Spec("captum", "captum.attr.InputXGradient", None, _ABS_SUM,
                                     "abs-sum"),
    "captum:integrated-gradients": _Spec("captum", "captum.attr.IntegratedGradients", None,
                                         _ABS_SUM, "abs-sum"),
    "captum:deeplift": _Spec("captum", "captum.attr.DeepLift", None, _ABS_SUM, "abs-sum"),
    "captum:guided-backprop": _Spec("captum", "captum.attr.GuidedBackprop", None, _MAX_ABS,
                                    "max-abs"),
    "captum:deconvolution": _Spec("captum", "captum.attr.Deconvolution", None, _MAX_ABS,
                                  "max-abs"),
    "captum:guided-gradcam": _Spec("captum", "captum.attr.GuidedGradCam", "cam", _MAX_ABS,
                                   "max-abs"),
    "captum:layer-gradcam": _Spec("captum", "captum.attr.LayerGradCam", "cam", _GRADCAM_RULE,
                                  "relu", {"relu_attributions": True}),
    "captum:occlusion": _Spec(
        "captum", "captum.attr.Occlusion", None,
        "positive part of the channel mean, max(0, f(x) - f(x occluded)) (Zeiler and Fergus "
        "2014: occluding evidence lowers the score)", "relu-mean"),
    # ------------------------------------------------------------------ pytorch-grad-cam
    "pgc:gradcam": _Spec("pytorch-grad-cam", "GradCAM", "cam", _PGC_RULE),
    "pgc:hirescam": _Spec("pytorch-grad-cam", "HiResCAM", "cam", _PGC_RULE),
    "pgc:gradcam-elementwise": _Spec("pytorch-grad-cam", "GradCAMElementWise", "cam", _PGC_RULE),
    "pgc:gradcam++": _Spec("pytorch-grad-cam", "GradCAMPlusPlus", "cam", _PGC_RULE),
    "pgc:xgradcam": _Spec("pytorch-grad-cam", "XGradCAM", "cam", _PGC_RULE),
    "pgc:layercam": _Spec("pytorch-grad-cam", "LayerCAM", "cam", _PGC_RULE),
    "pgc:eigencam": _Spec("pytorch-grad-cam", "EigenCAM", "cam", _PGC_RULE),
    "pgc:eigengradcam": _Spec("pytorch-grad-cam", "EigenGradCAM", "cam", _PGC_RULE),
    "pgc:scorecam": _Spec("pytorch-grad-cam", "ScoreCAM", "cam", _PGC_RULE),
    "pgc:ablationcam": _Spec("pytorch-grad-cam", "AblationCAM", "cam", _PGC_RULE),
}

#: Every name accepted by :func:`get_attribution`, in the order of
#: :func:`available_attributions`: captum-consistency's four, then ``captum:*`` and ``pgc:*``.
METHODS: Tuple[str, ...] = tuple(_SPECS)

_FAMILIES: Dict[str, type] = {
    "resnet": ResNet,
    "vgg": VGG,
    "alexnet": AlexNet,
    "convnext": ConvNeXt,
    "efficientnet": EfficientNet,
    "mobilenetv3": MobileNetV3,
    "densenet": DenseNet,
    "regnet": RegNet,
    "vit": VisionTransformer,
}
#: Architecture families with default layers (torchvision classes; ResNet includes ResNeXt and
#: Wide ResNet, EfficientNet includes V2).
ARCHITECTURES: Tuple[str, ...] = tuple(_FAMILIES)
_CMWP_FAMILIES = ("resnet", "vgg", "alexnet")
_LIBRARY_PREFIX = {"captum": "captum:", "pgc": "pgc:", "pytorch-grad-cam": "pgc:"}

# Messages Captum emits on every call of these methods; they carry no information here.
_CAPTUM_NOISE = (
    r"Setting backward hooks on ReLU activations",
    r"Input Tensor \d+ did not already require gradients",
    r"Setting forward, backward hooks and attributes on non-linear",
)


def canonical_name(name: str) -> str:
    """The registry key of ``name`` (case, ``_``/``-`` and a ``pytorch-grad-cam:`` prefix
    normalised); raises ``ValueError`` listing the known names for an unknown one."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key.startswith("pytorch-grad-cam:"):
        key = "pgc:" + key.split(":", 1)[1]
    if key not in _SPECS:
        raise ValueError(f"unknown attribution {name!r}; valid: {', '.join(METHODS)}")
    return key


def uses_cam_layer(name: str) -> bool:
    """Whether method ``name`` reads a CAM layer (``layer=`` of :func:`get_attribution`)."""
    return _SPECS[canonical_name(name)].layer == "cam"


def available_attributions(library: Optional[str] = None) -> List[str]:
    """The method names accepted by :func:`get_attribution`.

    Args:
        library (str, optional): ``"captum"`` or ``"pgc"`` (``"pytorch-grad-cam"``) for that
            library's names only, ``"captum-consistency"`` for this library's four; ``None``:
            all.

    Returns:
        list of str: ``["gradcam", "elementwise-gradcam", "cmwp", "fullgrad",
        "captum:saliency", ..., "pgc:gradcam", ...]``.

    Raises:
        ValueError: an unknown ``library``.

    Examples::

        >>> available_attributions("pgc")[:3]
        ['pgc:gradcam', 'pgc:hirescam', 'pgc:gradcam-elementwise']
        >>> for name in available_attributions():
        ...     saliency = get_attribution(name, model).attribute(images, labels)
    """
    if library is None:
        return list(METHODS)
    if library == "captum-consistency":
        return [n for n in METHODS if ":" not in n]
    if library not in _LIBRARY_PREFIX:
        raise ValueError(f"unknown library {library!r}; valid: captum, pgc, captum-consistency")
    return [n for n in METHODS if n.startswith(_LIBRARY_PREFIX[library])]


def detect_architecture(model: nn.Module) -> Optional[str]:
    """The torchvision family of ``model`` (one of :data:`ARCHITECTURES`), or ``None``.

    Args:
        model (torch.nn.Module): the model; subclasses of torchvision's classes count.

    Returns:
        str or None: e.g. ``"resnet"`` for ``resnet50`` or ``resnext50_32x4d``.

    Examples::

        >>> detect_architecture(torchvision.models.convnext_tiny())
        'convnext'
    """
    for arch, cls in _FAMILIES.items():
        if isinstance(model, cls):
            return arch
    return None


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _last(model: nn.Module, container: str, kind: type, from_end: int = 1) -> str:
    """Name of the ``from_end``-th last module of type ``kind`` inside ``model.<container>``."""
    parent = resolve_layer(model, container, container)
    found = [name for name, m in parent.named_modules() if isinstance(m, kind)]
    if len(found) < from_end:
        raise ValueError(f"{container} has fewer than {from_end} {kind.__name__} modules")
    return f"{container}.{found[-from_end]}"


def default_layers(model: nn.Module, arch: Optional[str] = None) -> Dict[str, str]:
    r"""The default layers of each architecture family, by role.

    ``layer`` is the CAM layer (Grad-CAM, the ``pgc:`` CAMs, Captum's ``LayerGradCam`` and
    ``GuidedGradCam``): the output of the last convolutional stage, where the GC loss
    regularises the map.

    - ``resnet``: ``layer4``; cMWP saliency at ``layer3``, contrast at ``avgpool`` (the pooled
      features), classifier ``fc``.
    - ``vgg``: the last ReLU of ``features`` (relu5, before pool5); cMWP saliency at pool4 (the
      second-to-last max pool of ``features``), contrast at relu7 (the last ReLU of
      ``classifier``), classifier its last ``Linear``.
    - ``alexnet``: ``features`` (conv5 after its ReLU and pool5, 6x6 at 224 px, the layer the
      GC loss regularises in the authors' code); cMWP saliency at pool2, contrast at relu7,
      classifier the last ``Linear``.
    - ``convnext``, ``efficientnet``, ``mobilenetv3``: ``features`` (the last stage; for
      EfficientNet and MobileNetV3 its final 1x1 convolution block).
    - ``densenet``: ``features.denseblock4``. Not ``features``: ``DenseNet.forward`` applies
      ``F.relu(..., inplace=True)`` to the output of ``features`` (= ``norm5``), which
      overwrites activations that hooks have recorded, differently on the CPU (shared
      storage) and the GPU (copied) in pytorch-grad-cam.
    - ``regnet``: ``trunk_output``.
    - ``vit``: ``ln_1`` of the last encoder block (pytorch-grad-cam's choice for vision
      transformers): the last block's output reaches the classifier through the class token
      only, so its patch tokens have no gradient.

    For VGG-16 the cMWP layers are ``features.23``, ``classifier.4`` and ``classifier.6``, those
    of TorchRay's pointing-game benchmark. cMWP has defaults for ``resnet``, ``vgg`` and
    ``alexnet`` only, the ReLU networks its excitation rules cover.

    Args:
        model (torch.nn.Module): the model (module names are read from it).
        arch (str, optional): one of :data:`ARCHITECTURES`; ``None``: detected from the model.

    Returns:
        dict with the name of ``layer`` and, for ResNet, VGG and AlexNet, of
        ``saliency_layer``, ``contrast_layer`` and ``classifier_layer`` (cMWP).

    Raises:
        ValueError: an unknown ``arch``, or a model of no known family.

    Examples::

        >>> default_layers(torchvision.models.vgg16())["saliency_layer"]
        'features.23'
        >>> default_layers(torchvision.models.densenet121())
        {'layer': 'features.denseblock4'}
    """
    if arch is None:
        arch = detect_architecture(model)
        if arch is None:
            raise ValueError(
                f"no default layers for {type(model).__name__}; known torchvision families: "
                f"{', '.join(ARCHITECTURES)}"
            )
    if arch == "resnet":
        return {
            "layer": "layer4",
            "saliency_layer": "layer3",
            "contrast_layer": "avgpool",
            "classifier_layer": "fc",
        }
    if arch in ("vgg", "alexnet"):
        return {
            "layer": "features" if arch == "alexnet" else _last(model, "features", nn.ReLU),
            "saliency_layer": _last(model, "features", nn.MaxPool2d, from_end=2),
            "contrast_layer": _last(model, "classifier", nn.ReLU),
            "classifier_layer": _last(model, "classifier", nn.Linear),
        }
    if arch in ("convnext", "efficientnet", "mobilenetv3"):
        return {"layer": "features"}
    if arch == "densenet":
        return {"layer": "features.denseblock4"}
    if arch == "regnet":
        return {"layer": "trunk_output"}
    if arch == "vit":
        blocks = resolve_layer(model, "encoder.layers", "encoder.layers")
        last = list(blocks.named_children())[-1][0]
        return {"layer": f"encoder.layers.{last}.ln_1"}
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")


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
        and count, with a warning.

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
            ValueError: a target outside ``[0, num_classes)``, or inputs that are not images.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            raise ValueError(f"inputs must be a tensor (N, C, H, W), got {getattr(inputs, 'shape', inputs)!r}")
        n = inputs.shape[0]
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
        out = out.detach().float()
        finite = torch.isfinite(out).flatten(1).all(1)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            warnings.warn(
                f"{self.name}: {bad} of {n} maps are not finite (NaN or infinity from the "
                f"{_SPECS[self.name].library} method); they are returned as all-zero maps, which "
                "the metrics skip and count",
                CaptumConsistencyWarning,
                stacklevel=2,
            )
            out = torch.where(finite.view(-1, 1, 1, 1), out, torch.zeros((), device=out.device))
        if upsample and tuple(out.shape[-2:]) != tuple(inputs.shape[-2:]):
            out = LayerAttribution.interpolate(out, tuple(inputs.shape[-2:]), "bilinear")
        return out

    __call__ = attribute


def _as_tuple(args: Optional[object]) -> Tuple[Any, ...]:
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


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
        arch (str, optional): one of :data:`ARCHITECTURES`, for a model with a family's
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
    elif arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")

    def named(value: Union[None, str, nn.Module], default: Optional[str], argname: str) -> Tuple[nn.Module, str]:
        module = resolve_layer(model, value if value is not None else default, argname)
        return module, _name_of(model, module)

    classifier = None
    if classifier_layer is not None:
        classifier = resolve_layer(model, classifier_layer, "classifier_layer")
    elif key == "cmwp" and arch in _CMWP_FAMILIES:
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
                f"family with a default ({', '.join(ARCHITECTURES)}): pass layer='<module name>' "
                "(e.g. the last convolutional stage), or arch=... for a model with a family's "
                "module names"
            )
        module, layer_name = named(layer, default_layers(model, arch)["layer"] if layer is None else None, "layer")
        layers = {"layer": layer_name}
    elif spec.layer == "cmwp":
        if arch not in _CMWP_FAMILIES and (layer is None or contrast_layer is None or classifier_layer is None):
            family = f"a {arch} model" if arch else f"{type(model).__name__}"
            raise ValueError(
                f"cmwp has default layers for {', '.join(_CMWP_FAMILIES)} (the ReLU networks its "
                f"excitation rules cover); for {family} pass layer=, contrast_layer= and "
                "classifier_layer="
            )
        defaults = default_layers(model, arch) if arch in _CMWP_FAMILIES else {}
        module, layer_name = named(layer, defaults.get("saliency_layer"), "layer")
        contrast, contrast_name = named(contrast_layer, defaults.get("contrast_layer"), "contrast_layer")
        assert classifier is not None
        layers = {"layer": layer_name, "contrast_layer": contrast_name,
                  "classifier_layer": _name_of(model, classifier)}

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
