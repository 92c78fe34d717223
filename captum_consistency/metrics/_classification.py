"""Classification metrics of the training and evaluation loops: top-1, multi-label F1, losses.

:class:`ClassificationMeter` keeps its running sums on the device, so that a training step
never waits for the host; :meth:`ClassificationMeter.result` reads them once (one all-reduce
under ``torch.distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["multilabel_f1", "ClassificationMeter"]


def multilabel_f1(tp: Tensor, fp: Tensor, fn: Tensor) -> Tuple[Tensor, float]:
    """Per-class and overall F1 (in [0, 1]) from per-class counts, as the authors compute them.

    Per class: precision ``tp / (tp + fp)`` and recall ``tp / (tp + fn)``, F1 their harmonic
    mean, 0 for a class without true positives; the per-class F1 of the paper's Table 2 is the
    mean of these. The overall F1 uses the counts summed over classes.

    Args:
        tp (Tensor): ``(C,)`` true positives per class.
        fp (Tensor): ``(C,)`` false positives per class.
        fn (Tensor): ``(C,)`` false negatives per class.

    Returns:
        ``(f1 per class (C,), f1_overall)``.

    Examples::

        >>> f1, overall = multilabel_f1(torch.tensor([2, 0]), torch.tensor([0, 1]),
        ...                             torch.tensor([2, 1]))
        >>> f1, overall
        (tensor([0.6667, 0.0000], dtype=torch.float64), 0.5)
    """
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    denom_p = (tp + fp).clamp_min(1)
    denom_r = (tp + fn).clamp_min(1)
    precision, recall = tp / denom_p, tp / denom_r
    f1 = torch.where(tp > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    tps, fps, fns = tp.sum(), fp.sum(), fn.sum()
    f1_overall = float(2 * tps / (2 * tps + fps + fns)) if tps > 0 else 0.0
    return f1, f1_overall


def _zero(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.float64, device=device)


@dataclass
class ClassificationMeter:
    """Running sums of a classification pass, on the device; read with one host sync.

    The loss terms are summed weighted by the batch size, so that :meth:`result` gives
    per-image averages. For multi-hot targets (``multilabel``) a logit above 0 is a positive
    and the meter keeps per-class true positive, false positive and false negative counts for
    :func:`multilabel_f1`; ``correct`` then counts the images whose every label is right.

    Args:
        device (torch.device): where the sums live (the logits' device).
        num_classes (int, optional): number of classes; needed for multi-label F1 under
            ``torch.distributed`` (every rank must all-reduce tensors of the same size).
        multilabel (bool): multi-hot targets.

    Attributes:
        loss, classification, consistency: sums of the loss terms times the batch size.
        correct: top-1 hits (multi-label: exact matches).
        count: images seen.
        true_pos, false_pos, false_neg: ``(num_classes,)`` counts (multi-label only).

    Examples::

        >>> meter = ClassificationMeter(torch.device("cpu"))
        >>> meter.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> meter.result()["top1"]
        0.5
    """

    device: torch.device
    num_classes: Optional[int] = None
    multilabel: bool = False
    loss: Tensor = field(init=False)
    classification: Tensor = field(init=False)
    consistency: Tensor = field(init=False)
    correct: Tensor = field(init=False)
    count: Tensor = field(init=False)
    true_pos: Optional[Tensor] = field(init=False, default=None)
    false_pos: Optional[Tensor] = field(init=False, default=None)
    false_neg: Optional[Tensor] = field(init=False, default=None)

    # Not fields (no annotation): the names of the sums, in the order of the one all-reduce.
    _SUMS = ("loss", "classification", "consistency", "correct", "count")
    _COUNTS = ("true_pos", "false_pos", "false_neg")

    def __post_init__(self) -> None:
        for name in self._SUMS:
            setattr(self, name, _zero(self.device))
        if self.multilabel and self.num_classes:
            self._init_counts(self.num_classes)

    def _init_counts(self, num_classes: int) -> None:
        for name in self._COUNTS:
            setattr(self, name, torch.zeros(num_classes, dtype=torch.float64, device=self.device))

    def update(
        self,
        logits: Tensor,
        targets: Tensor,
        loss: Optional[Tensor] = None,
        classification: Optional[Tensor] = None,
        consistency: Optional[Tensor] = None,
    ) -> None:
        """Adds a batch.

        Args:
            logits (Tensor): ``(N, K)``.
            targets (Tensor): ``(N,)`` class ids or ``(N, K)`` multi-hot.
            loss (Tensor, optional): the batch's mean total loss.
            classification (Tensor, optional): its mean classification term.
            consistency (Tensor, optional): its mean consistency term.
        """
        n = logits.shape[0]
        logits = logits.detach()
        for name, value in (("loss", loss), ("classification", classification),
                            ("consistency", consistency)):
            if value is not None:
                getattr(self, name).add_(value.detach().double() * n)
        self.count += n
        if not self.multilabel:
            self.correct += (logits.argmax(dim=1) == targets).sum()
            return
        pred, truth = logits > 0, targets > 0.5
        if self.true_pos is None:
            self._init_counts(logits.shape[1])
        self.true_pos += (pred & truth).sum(0)
        self.false_pos += (pred & ~truth).sum(0)
        self.false_neg += (~pred & truth).sum(0)
        self.correct += (pred == truth).all(dim=1).sum()

    def result(self, reduce: bool = True) -> Dict[str, Any]:
        """Per-image averages over everything added (over all ranks when ``reduce``).

        Args:
            reduce (bool): sum over the ranks of ``torch.distributed`` first (a collective:
                every rank must call it).

        Returns:
            dict: ``loss``, ``classification``, ``consistency``, ``samples`` and ``top1`` (or,
            multi-label, ``f1_per_class``, ``f1_overall`` and ``exact_match``).
        """
        names = self._SUMS + (self._COUNTS if self.true_pos is not None else ())
        flat = torch.cat([getattr(self, name).reshape(-1) for name in names])
        if reduce and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        sums = dict(zip(self._SUMS, flat[: len(self._SUMS)].tolist()))
        n = max(sums["count"], 1.0)
        out: Dict[str, Any] = {
            "loss": sums["loss"] / n,
            "classification": sums["classification"] / n,
            "consistency": sums["consistency"] / n,
            "samples": int(sums["count"]),
        }
        if self.multilabel and self.true_pos is not None:
            tp, fp, fn = flat[len(self._SUMS):].view(3, -1)
            f1, f1_overall = multilabel_f1(tp, fp, fn)
            out["f1_per_class"] = float(f1.mean())
            out["f1_overall"] = f1_overall
            out["exact_match"] = sums["correct"] / n
        else:
            out["top1"] = sums["correct"] / n
        return out
