"""Adapters that turn Captum's and pytorch-grad-cam's attributions into saliency maps.

The adapters live in ``_captum_adapter`` (:class:`CaptumAttribution`, :data:`REDUCTIONS`) and
``_pgc_adapter`` (:class:`PytorchGradCamAttribution`, :func:`vit_reshape_transform`), the checks
of the modified-gradient rules in ``_nonlinearities``; this module keeps the adapters' former
import path.
"""

from captum_consistency.attr._captum_adapter import REDUCTIONS, CaptumAttribution
from captum_consistency.attr._pgc_adapter import PytorchGradCamAttribution, vit_reshape_transform

__all__ = [
    "CaptumAttribution",
    "PytorchGradCamAttribution",
    "REDUCTIONS",
    "vit_reshape_transform",
]
