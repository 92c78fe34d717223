"""Classification losses used next to the GC term."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ScaledBCEWithLogitsLoss"]


class ScaledBCEWithLogitsLoss(nn.Module):
    r"""``weight * BCEWithLogits(logits, targets)``, the authors' multi-label loss (weight 80).

    With ``weight = num_classes`` this is the BCE summed over categories and averaged over
    images.

    Args:
        weight (float): the factor (80 for MS-COCO).

    Examples::

        >>> criterion = ScaledBCEWithLogitsLoss(80.0)
        >>> loss = criterion(logits, multi_hot)       # multi_hot: (N, 80) in {0, 1}
    """

    def __init__(self, weight: float = 80.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The scaled loss of a batch.

        Args:
            logits (Tensor): ``(N, K)`` logits (computed in float32 even under autocast).
            targets (Tensor): ``(N, K)`` multi-hot targets in ``{0, 1}``.

        Returns:
            Tensor: scalar, ``weight`` times the mean BCE-with-logits over all entries.
        """
        return self.weight * F.binary_cross_entropy_with_logits(logits.float(), targets.float())
