"""The classification evaluation loop: top-1 accuracy or multi-label F1 of a model, over all ranks."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from captum_consistency.engine.batches import as_train_batch
from captum_consistency.engine.distributed import all_reduce_sum
from captum_consistency.engine.training import _to_device
from captum_consistency.metrics import ClassificationMeter

__all__ = ["evaluate_classification"]


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    multilabel: bool = False,
    amp: bool = False,
    channels_last: bool = False,
    num_classes: Optional[int] = None,
) -> Dict[str, Any]:
    """Top-1 accuracy, or per-class and overall F1 for multi-hot targets, over all ranks.

    Use a sampler that gives each sample to exactly one rank
    (:class:`~captum_consistency.engine.ShardSampler`): the sums are all-reduced. Pass
    ``num_classes`` for multi-label data under torchrun.

    Args:
        model (torch.nn.Module): the classifier (put in eval mode, its mode restored after).
        loader (Iterable): batches as for :func:`train_one_epoch` (:func:`as_train_batch`).
        device (torch.device): where to compute.
        multilabel (bool): multi-hot targets: F1 (logit > 0 is a positive) instead of top-1.
        amp (bool): bf16 autocast.
        channels_last (bool): channels-last memory format for the images.
        num_classes (int, optional): number of classes, for multi-label F1 under torchrun.

    Returns:
        dict: ``top1`` (or ``f1_per_class``, ``f1_overall``, ``exact_match``) in [0, 1], and
        ``samples``.

    Examples::

        >>> val = DataLoader(val_set, batch_size=64, sampler=ShardSampler(len(val_set), rank, world))
        >>> evaluate_classification(model, val, torch.device("cuda"))["top1"]
    """
    was_training = model.training
    model.eval()
    meter = ClassificationMeter(device, num_classes, multilabel)
    skipped = 0
    for raw in loader:
        batch = as_train_batch(raw)
        skipped += batch.skipped
        if batch.images.shape[0] == 0:
            continue
        images, targets = _to_device(batch.images, batch.targets, device, channels_last)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        meter.update(logits.float(), targets)
    model.train(was_training)
    result = meter.result()
    for key in ("loss", "classification", "consistency"):
        result.pop(key)
    result["skipped"] = int(all_reduce_sum(torch.tensor([skipped], device=device))[0])
    return result
