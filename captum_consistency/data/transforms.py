"""Image transforms of the paper, and batching of whole images for evaluation.

Training (Pillai & Pirsiavash, AAAI 2021, Sec. 5): the usual ImageNet augmentation, a random
resized crop of side ``S`` (224) and a horizontal flip; the GC composite of four such crops is
``2S x 2S``. Evaluation: the whole image, resized so that its *short* side is ``2S`` (448), with
no crop, so that the saliency map can be resized back to the original image and compared with
the boxes or masks.

Whole-image evaluation gives images of different shapes. :class:`SizeGroupedBatchSampler` batches
together the images whose resized shapes are equal (most photographs are 4:3 or 3:4), so that
evaluation runs in real batches with no padding, which would change the model's output.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Sampler
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "train_transform",
    "eval_transform",
    "resized_size",
    "SizeGroupedBatchSampler",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel (RGB) mean of torchvision's ImageNet normalisation, on the 0-1 pixel scale."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel (RGB) standard deviation of torchvision's ImageNet normalisation."""



def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def train_transform(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The training transform of the paper: random resized crop, horizontal flip, normalisation.

    Args:
        image_size (int): side ``S`` of the square crop (224 in the paper); the GC composite is
            ``2S x 2S``.
        mean (sequence of float): per-channel mean of :class:`torchvision.transforms.v2.Normalize`.
        std (sequence of float): per-channel standard deviation.

    Returns:
        A :class:`torchvision.transforms.v2.Compose` mapping a PIL image (or a uint8 ``(C, H, W)``
        tensor) to a float32 ``(3, S, S)`` tensor.

    Examples::

        >>> t = train_transform(224)
        >>> t(PIL.Image.new("RGB", (500, 375))).shape
        torch.Size([3, 224, 224])
    """
    s = _check_image_size(image_size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(s, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_transform(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The evaluation transform of the paper: the whole image, short side resized to ``2S``.

    No crop: the aspect ratio is kept, so an ``H x W`` image becomes
    :func:`resized_size` ``((H, W), 2 * image_size)``; saliency maps computed on it are resized
    back to ``(H, W)`` before the metrics.

    Args:
        image_size (int): the training crop side ``S``; the short side becomes ``2S`` (448 for
            ``S = 224``), the scale of an image inside a training composite.
        mean (sequence of float): per-channel mean of the normalisation.
        std (sequence of float): per-channel standard deviation.

    Returns:
        A :class:`torchvision.transforms.v2.Compose` mapping a PIL image (or uint8 tensor) to a
        float32 ``(3, h, w)`` tensor with ``min(h, w) == 2S``.

    Examples::

        >>> eval_transform(224)(PIL.Image.new("RGB", (500, 375))).shape
        torch.Size([3, 448, 597])
    """
    s = _check_image_size(image_size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(2 * s, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def resized_size(size: Tuple[int, int], short_side: int) -> Tuple[int, int]:
    """The ``(h, w)`` that :func:`eval_transform` gives an image of original ``(H, W)``.

    Same rounding as :class:`torchvision.transforms.v2.Resize` with an int size: the short side
    becomes ``short_side`` and the long side ``int(short_side * long / short)`` (truncated).

    Args:
        size (tuple of int): original ``(H, W)``.
        short_side (int): the requested short side (``2 * image_size`` for :func:`eval_transform`).

    Returns:
        tuple ``(h, w)``.

    Examples::

        >>> resized_size((375, 500), 448)
        (448, 597)
    """
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be a positive (H, W), got {tuple(size)}")
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = short_side, int(short_side * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


class SizeGroupedBatchSampler(Sampler[List[int]]):
    """Batches of indices whose images have the same shape after a short-side resize.

    For the paper's evaluation protocol (whole image, short side ``2S``) without padding: images
    of equal resized shape stack into one tensor. ImageNet and COCO are mostly 4:3 and 3:4
    photographs, so nearly all batches are full. Under ``torchrun`` give ``num_replicas`` and
    ``rank``: the batches are dealt round-robin, each rank gets a disjoint share and together the
    ranks see every index exactly once (no padding, so no sample is counted twice).

    Args:
        sizes (sequence of (H, W)): original size of every sample, e.g.
            ``dataset.original_sizes()``. Entries ``(0, 0)`` (unreadable images) form their own
            group.
        batch_size (int): the largest batch.
        short_side (int, optional): resize target of the short side (``2 * image_size``); with
            ``None``, images are grouped by their original size.
        drop_last (bool): drop incomplete batches (never wanted for evaluation).
        num_replicas (int, optional): number of processes (``torch.distributed`` world size).
        rank (int, optional): this process's rank in ``0 .. num_replicas - 1``.

    Examples::

        >>> sampler = SizeGroupedBatchSampler(val.original_sizes(), 64, short_side=448)
        >>> loader = DataLoader(val, batch_sampler=sampler, collate_fn=val.collate_fn)
    """

    def __init__(
        self,
        sizes: Sequence[Tuple[int, int]],
        batch_size: int,
        short_side: Optional[int] = None,
        drop_last: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_replicas is None:
            num_replicas = 1
        if rank is None:
            rank = 0
        if num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"rank must lie in 0..num_replicas-1, got rank={rank}, num_replicas={num_replicas}"
            )
        groups: dict = defaultdict(list)
        for i, (h, w) in enumerate(sizes):
            key = (int(h), int(w))
            if short_side is not None and key[0] > 0 and key[1] > 0:
                key = resized_size(key, short_side)
            groups[key].append(i)
        batches: List[List[int]] = []
        for key in sorted(groups):
            idx = groups[key]
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                if drop_last and len(chunk) < batch_size:
                    continue
                batches.append(chunk)
        self.batch_size = batch_size
        self.short_side = short_side
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_groups = len(groups)
        self._batches = batches[rank::num_replicas]

    def __iter__(self) -> Iterator[List[int]]:
        return iter([list(b) for b in self._batches])

    def __len__(self) -> int:
        return len(self._batches)


def _stack_images(images: Sequence[Tensor], what: str = "images") -> Tensor:
    """Stacks equally shaped image tensors, or raises a ValueError explaining the fix."""
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot batch {what} of different shapes {sorted(shapes)[:4]}"
            f"{' ...' if len(shapes) > 4 else ''}: whole-image evaluation needs "
            "SizeGroupedBatchSampler(dataset.original_sizes(), batch_size, short_side=2 * image_size) "
            "as the DataLoader's batch_sampler (or batch_size=1)"
        )
    return torch.stack(list(images))

