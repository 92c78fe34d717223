"""Losses: the Grad-CAM consistency (GC) loss of Pillai & Pirsiavash (AAAI 2021) and its parts.

* [`GradCamConsistencyLoss`][captum_consistency.GradCamConsistencyLoss] (module ``gc``): the
  training loss, classification plus ``lambda`` times the consistency term, with its output
  [`ConsistencyLossOutput`][captum_consistency.ConsistencyLossOutput].
* [`gc_consistency`][captum_consistency.gc_consistency] (module
  ``functional``): Eq. 5 as a function of two maps.
* [`ScaledBCEWithLogitsLoss`][captum_consistency.engine.ScaledBCEWithLogitsLoss] (module
  ``classification``): the authors' multi-label classification loss.

[`LayerRecorder`][captum_consistency.LayerRecorder] lives in ``captum_consistency.attr`` and is
re-exported here.
"""

from captum_consistency.attr._recording import LayerRecorder
from captum_consistency.losses.classification import ScaledBCEWithLogitsLoss
from captum_consistency.losses.functional import GCConsistency, gc_consistency
from captum_consistency.losses.gc import COMPOSITE_MODES  # noqa: F401  (the values of composites=)
from captum_consistency.losses.gc import ConsistencyLossOutput, GradCamConsistencyLoss

__all__ = [
    "GradCamConsistencyLoss",
    "ConsistencyLossOutput",
    "LayerRecorder",
    "gc_consistency",
    "GCConsistency",
    "ScaledBCEWithLogitsLoss",
]
