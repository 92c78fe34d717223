"""Losses: the Grad-CAM consistency (GC) loss of Pillai & Pirsiavash (AAAI 2021) and its parts.

* [`GradCamConsistencyLoss`][captum_consistency.GradCamConsistencyLoss] (module ``gc``): the
  training loss, classification plus ``lambda`` times the consistency term, with its output
  [`ConsistencyLossOutput`][captum_consistency.ConsistencyLossOutput].
* [`gc_consistency`][captum_consistency.gc_consistency] (module
  ``functional``): Eq. 5 as a function of two maps.
* [`ScaledBCEWithLogitsLoss`][captum_consistency.engine.ScaledBCEWithLogitsLoss] (module
  ``classification``): the authors' multi-label classification loss.

Explanation-guided losses on one interface (an ``nn.Module`` returning a dataclass with
``.loss``, its parts and detached maps, plus a functional twin), listed in
:data:`EXPLANATION_LOSSES`:

* self-supervised: ``"gc"`` (above) and ``"cgc"``,
  [`ContrastiveGradCamLoss`][captum_consistency.losses.ContrastiveGradCamLoss] (module ``cgc``);
* guided by a mask or box (module ``guided``): ``"energy"``
  [`EnergyLoss`][captum_consistency.losses.EnergyLoss], ``"l1"``
  [`L1MaskLoss`][captum_consistency.losses.L1MaskLoss], ``"ppce"``
  [`PPCELoss`][captum_consistency.losses.PPCELoss], ``"rrr"``
  [`RRRLoss`][captum_consistency.losses.RRRLoss] and ``"rrr-gradcam"``
  [`RRRGradCamLoss`][captum_consistency.losses.RRRGradCamLoss].

[`LayerRecorder`][captum_consistency.LayerRecorder] lives in ``captum_consistency.attr`` and is
re-exported here.
"""

from captum_consistency.attr._recording import LayerRecorder
from captum_consistency.losses.classification import ScaledBCEWithLogitsLoss
from captum_consistency.losses.cgc import ContrastiveGradCamLoss, ContrastiveLossOutput, crop_and_flip, random_crop_boxes
from captum_consistency.losses.functional import (
    GCConsistency,
    cgc_infonce,
    energy_loss,
    gc_consistency,
    l1_mask_loss,
    ppce_loss,
    rrr_gradcam_loss,
    rrr_loss,
)
from captum_consistency.losses.gc import COMPOSITE_MODES  # noqa: F401  (the values of composites=)
from captum_consistency.losses.gc import ConsistencyLossOutput, GradCamConsistencyLoss
from captum_consistency.losses.guided import (
    EnergyLoss,
    GuidedLossOutput,
    L1MaskLoss,
    PPCELoss,
    RRRGradCamLoss,
    RRRLoss,
)

#: name -> loss class: the explanation-guided losses (``recipes/train.py --loss NAME``).
EXPLANATION_LOSSES = {
    "gc": GradCamConsistencyLoss,
    "cgc": ContrastiveGradCamLoss,
    "energy": EnergyLoss,
    "l1": L1MaskLoss,
    "ppce": PPCELoss,
    "rrr": RRRLoss,
    "rrr-gradcam": RRRGradCamLoss,
}

#: the names of :data:`EXPLANATION_LOSSES` whose ``forward`` needs per-image object masks.
MASK_LOSSES = tuple(name for name, cls in EXPLANATION_LOSSES.items() if getattr(cls, "needs_masks", False))

__all__ = [
    "GradCamConsistencyLoss",
    "ConsistencyLossOutput",
    "LayerRecorder",
    "gc_consistency",
    "GCConsistency",
    "ScaledBCEWithLogitsLoss",
    "EXPLANATION_LOSSES",
    "MASK_LOSSES",
    "ContrastiveGradCamLoss",
    "ContrastiveLossOutput",
    "cgc_infonce",
    "crop_and_flip",
    "random_crop_boxes",
    "EnergyLoss",
    "L1MaskLoss",
    "PPCELoss",
    "RRRLoss",
    "RRRGradCamLoss",
    "GuidedLossOutput",
    "energy_loss",
    "l1_mask_loss",
    "ppce_loss",
    "rrr_loss",
    "rrr_gradcam_loss",
]
