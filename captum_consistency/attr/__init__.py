"""Attribution methods, Captum style: element-wise Grad-CAM and the transfer methods."""

from captum_consistency.attr._elementwise_grad_cam import (
    LayerElementwiseGradCam,
    elementwise_grad_cam,
    grad_cam,
)
from captum_consistency.attr._excitation_backprop import ContrastiveExcitationBackprop
from captum_consistency.attr._fullgrad import FullGrad, FullGradDecomposition
from captum_consistency.attr._registry import SaliencyMethod, available_attributions, get_attribution

__all__ = [
    "LayerElementwiseGradCam",
    "elementwise_grad_cam",
    "grad_cam",
    "ContrastiveExcitationBackprop",
    "FullGrad",
    "FullGradDecomposition",
    "get_attribution",
    "available_attributions",
    "SaliencyMethod",
]
