"""Attribution methods, Captum style: element-wise Grad-CAM and the transfer methods."""

from captum_consistency.attr._elementwise_grad_cam import (
    LayerElementwiseGradCam,
    elementwise_grad_cam,
    grad_cam,
)

__all__ = ["LayerElementwiseGradCam", "elementwise_grad_cam", "grad_cam"]
