"""captum-consistency: train image classifiers whose Grad-CAM interpretations are consistent.

Implements "Explainable Models with Consistent Interpretations" (Pillai & Pirsiavash, AAAI 2021)
as an add-on to Captum: a differentiable element-wise Grad-CAM, the 2x2 image composer, the
Grad-CAM consistency (GC) loss, global max pooling for ResNets, the paper's interpretation
metrics, and transfer evaluation with other attribution methods.
"""

from captum_consistency._warnings import CaptumConsistencyWarning, SkippedImageWarning
from captum_consistency.composition import cell_mask, cell_rows_cols, compose_grid, split_grid
from captum_consistency.losses import ConsistencyLossOutput, GradCamConsistencyLoss, LayerRecorder, gc_consistency
from captum_consistency.models import fold_batch_norm, to_global_max_pool
from captum_consistency.saliency import normalize_saliency

__version__ = "0.1.0"

__all__ = [
    "compose_grid",
    "split_grid",
    "cell_mask",
    "cell_rows_cols",
    "normalize_saliency",
    "GradCamConsistencyLoss",
    "ConsistencyLossOutput",
    "LayerRecorder",
    "gc_consistency",
    "to_global_max_pool",
    "fold_batch_norm",
    "CaptumConsistencyWarning",
    "SkippedImageWarning",
    "__version__",
]
