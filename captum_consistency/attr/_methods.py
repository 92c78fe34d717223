"""The registry's method table: every name, the class it wraps and its non-negativity rule.

:data:`METHODS` is the one list of the names :func:`~captum_consistency.attr.get_attribution`
accepts; the evaluation and the transfer benchmark import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["METHODS", "available_attributions", "canonical_name", "uses_cam_layer"]


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

METHODS: Tuple[str, ...] = tuple(_SPECS)
"""Every name accepted by :func:`~captum_consistency.attr.get_attribution`, in the order of
:func:`~captum_consistency.attr.available_attributions`: captum-consistency's four, then
``captum:*`` and ``pgc:*``. The evaluation's and the transfer benchmark's method lists are this
tuple."""
_LIBRARY_PREFIX = {"captum": "captum:", "pgc": "pgc:", "pytorch-grad-cam": "pgc:"}


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
