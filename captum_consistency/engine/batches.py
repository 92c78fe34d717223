"""What a training or evaluation loop consumes: :class:`TrainBatch` and :func:`as_train_batch`.

The library's loaders yield several kinds of batches (default-collated tuples, the data sets'
batch classes, the triples of the data-set distractors); the loops read them all through
:func:`as_train_batch`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["TrainBatch", "as_train_batch"]


class TrainBatch(NamedTuple):
    """A training batch as :func:`train_one_epoch` consumes it.

    Attributes:
        images: ``(N, C, S, S)``.
        targets: ``(N,)`` class ids or ``(N, K)`` multi-hot.
        distractors: ``(N, 3, C, S, S)`` decoded by the loader (``--distractors dataset``), or
            ``None`` to take them from the batch.
        gradcam_targets: ``(N,)`` regularised classes chosen by the loader, or ``None``.
        skipped: images of this batch dropped because they could not be decoded.
        masks: ``(N, S, S)`` bool object masks in the crops (the mask-guided losses), or
            ``None``.

    Examples::

        >>> batch = TrainBatch(torch.rand(8, 3, 64, 64), torch.randint(0, 10, (8,)))
        >>> batch.distractors is None  # train_one_epoch takes them from the batch
        True
    """

    images: Tensor
    targets: Tensor
    distractors: Optional[Tensor] = None
    gradcam_targets: Optional[Tensor] = None
    skipped: int = 0
    masks: Optional[Tensor] = None


def as_train_batch(batch: Any) -> TrainBatch:
    """Normalises what the library's loaders yield into a :class:`TrainBatch`.

    Accepts ``(images, targets)`` tuples (default collate), the library's batches
    (:class:`~captum_consistency.data.ImageBatch`, :class:`~captum_consistency.data.CocoBatch`:
    ``.images``, ``.targets``, ``.skipped``; a ``.masks`` tensor and ``.gradcam_targets``, as
    :class:`~captum_consistency.data.MaskedBatch` has, are kept) and the ``(batch, distractors,
    gradcam_targets)`` triples of :func:`~captum_consistency.data.collate_with_distractors`.

    Args:
        batch (Any): what a training ``DataLoader`` yields (see above), or a
            :class:`TrainBatch` (returned unchanged).

    Returns:
        TrainBatch: with ``targets`` as a tensor and ``skipped`` counted.

    Examples::

        >>> b = as_train_batch((torch.rand(4, 3, 32, 32), [0, 1, 2, 3]))
        >>> b.targets, b.skipped
        (tensor([0, 1, 2, 3]), 0)
    """
    if isinstance(batch, TrainBatch):
        return batch
    distractors = gradcam_targets = None
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 3
        and isinstance(batch[1], Tensor)
        and batch[1].dim() == 5
    ):
        batch, distractors, gradcam_targets = batch
    images = getattr(batch, "images", None)
    masks = None
    if images is not None:
        targets, skipped = batch.targets, int(getattr(batch, "skipped", 0))
        masks = getattr(batch, "masks", None)
        if not isinstance(masks, Tensor):  # COCO's evaluation batches hold lists of masks
            masks = None
        if gradcam_targets is None and isinstance(getattr(batch, "gradcam_targets", None), Tensor):
            gradcam_targets = batch.gradcam_targets
    else:
        images, targets, skipped = batch[0], batch[1], 0
    if not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    return TrainBatch(images, targets, distractors, gradcam_targets, skipped, masks)
