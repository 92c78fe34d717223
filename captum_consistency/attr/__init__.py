"""Attribution methods, Captum style: element-wise Grad-CAM, the transfer methods, and one
registry over them, Captum's attributions and pytorch-grad-cam's CAMs."""

from captum_consistency.attr._adapters import (
    CaptumAttribution,
    PytorchGradCamAttribution,
    vit_reshape_transform,
)
from captum_consistency.attr._elementwise_grad_cam import (
    LayerElementwiseGradCam,
    elementwise_grad_cam,
    grad_cam,
)
from captum_consistency.attr._differentiable import (
    DIFFERENTIABLE_ATTRIBUTIONS,
    AttributionMaps,
    differentiable_attribution,
)
from captum_consistency.attr._excitation_backprop import ContrastiveExcitationBackprop
from captum_consistency.attr._fullgrad import FullGrad, FullGradDecomposition
# LayerRecorder is importable from here too; it is documented (and listed) at the top level.
from captum_consistency.attr._recording import LayerGradients, LayerRecorder, layer_gradients, score_gradients
from captum_consistency.attr._registry import (
    ARCHITECTURE_FAMILIES,
    METHODS,
    SaliencyMethod,
    available_attributions,
    default_layers,
    detect_architecture,
    get_attribution,
)

__all__ = [
    "LayerElementwiseGradCam",
    "elementwise_grad_cam",
    "grad_cam",
    "LayerGradients",
    "layer_gradients",
    "score_gradients",
    "DIFFERENTIABLE_ATTRIBUTIONS",
    "differentiable_attribution",
    "AttributionMaps",
    "ContrastiveExcitationBackprop",
    "FullGrad",
    "FullGradDecomposition",
    "get_attribution",
    "available_attributions",
    "SaliencyMethod",
    "default_layers",
    "detect_architecture",
    "METHODS",
    "ARCHITECTURE_FAMILIES",
    "CaptumAttribution",
    "PytorchGradCamAttribution",
    "vit_reshape_transform",
]
