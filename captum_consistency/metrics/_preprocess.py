"""Preparing inputs for the metrics: boxes to masks, saliency to the image's original size."""

from __future__ import annotations

import numbers
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["boxes_to_mask", "resize_saliency"]

Size = Tuple[int, int]


def _check_size(size, argname: str = "size") -> Size:
    if (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != 2
        or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size
        )
    ):
        raise ValueError(f"{argname} must be a pair of positive integers (H, W), got {size!r}")
    return int(size[0]), int(size[1])


@torch.no_grad()
def boxes_to_mask(
    boxes: Union[Tensor, Sequence[Tensor]], size: Size, one_based: bool = False
) -> Tensor:
    r"""Rasterises bounding boxes ``(x1, y1, x2, y2)`` into boolean object masks.

    Pixel ``(row i, column j)`` belongs to a box when

    $$
    x_1 \le j \le x_2 \quad\text{and}\quad y_1 \le i \le y_2,
    $$

    i.e. boxes are given in **0-based pixel indices, both corners inclusive**: ``(0, 0, W - 1,
    H - 1)`` is the whole image and ``(5, 5, 5, 5)`` a single pixel. Fractional coordinates
    (boxes rescaled to another resolution) keep the pixels whose index lies in the interval.
    PASCAL VOC and ImageNet (ILSVRC) annotation files use 1-based inclusive corners: pass
    ``one_based=True`` to subtract one first, which is what TorchRay's ``voc_as_mask`` does. For
    COCO ``[x, y, w, h]`` boxes use ``(x, y, x + w - 1, y + h - 1)``, or better the instance
    segmentation masks from pycocotools. A sample's mask is the union of its boxes; boxes with
    ``x2 < x1`` or ``y2 < y1`` or NaN coordinates are empty, which is how padding rows are
    written. Fully vectorised: one batched matrix product, no loop over boxes.

    Args:
        boxes (Tensor or sequence of Tensor): one of

            * ``(B, 4)``: the boxes of one image, gives an ``(H, W)`` mask;
            * ``(N, B, 4)``: ``B`` boxes for each of ``N`` images, padded with empty boxes (e.g.
              NaN rows), gives ``(N, H, W)``;
            * a list of ``N`` tensors ``(B_i, 4)``, gives ``(N, H, W)``.
        size (tuple): ``(H, W)`` of the masks.
        one_based (bool): the corners are 1-based (VOC, ImageNet XML) rather than 0-based.

    Returns:
        Tensor: bool ``(H, W)`` or ``(N, H, W)`` on the boxes' device.

    Raises:
        ValueError: boxes not of shape ``(..., 4)``, or a bad ``size``.

    Examples:
        >>> boxes_to_mask(torch.tensor([[1, 0, 2, 1]]), (3, 4)).int()
        tensor([[0, 1, 1, 0],
                [0, 1, 1, 0],
                [0, 0, 0, 0]], dtype=torch.int32)
        >>> masks = boxes_to_mask([torch.tensor([[0.0, 0, 9, 9]]), torch.zeros(0, 4)], (32, 32))
        >>> masks.shape, masks[1].any()
        (torch.Size([2, 32, 32]), tensor(False))
    """
    height, width = _check_size(size)
    single = False
    if isinstance(boxes, Tensor):
        if boxes.dim() == 2:
            boxes, single = boxes.unsqueeze(0), True
        if boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(
                "boxes must have shape (B, 4) or (N, B, 4) as (x1, y1, x2, y2), "
                f"got {tuple(boxes.shape)}"
            )
    elif isinstance(boxes, (list, tuple)):
        items = [torch.as_tensor(b) for b in boxes]
        for i, b in enumerate(items):
            if b.dim() != 2 or b.shape[-1] != 4:
                raise ValueError(f"boxes[{i}] must have shape (B_i, 4), got {tuple(b.shape)}")
        if not items:
            return torch.zeros(0, height, width, dtype=torch.bool)
        dtype = torch.promote_types(torch.float32, items[0].dtype)
        boxes = torch.nn.utils.rnn.pad_sequence(
            [b.to(dtype) for b in items], batch_first=True, padding_value=float("nan")
        )
    else:
        raise TypeError(f"boxes must be a Tensor or a list of Tensors, got {type(boxes).__name__}")

    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    if one_based:
        boxes = boxes - 1
    x1, y1, x2, y2 = boxes.unbind(-1)  # (N, B) each
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    in_cols = (cols >= x1.unsqueeze(-1)) & (cols <= x2.unsqueeze(-1))  # (N, B, W)
    in_rows = (rows >= y1.unsqueeze(-1)) & (rows <= y2.unsqueeze(-1))  # (N, B, H)
    # Union over boxes: sum_b in_rows[b, i] * in_cols[b, j] > 0, a batched (H, B) @ (B, W).
    # Small integer counts are exact in float32.
    covered = torch.bmm(in_rows.transpose(1, 2).float(), in_cols.float()) > 0
    return covered[0] if single else covered


def resize_saliency(
    saliency: Tensor, size: Union[Size, Sequence[Size]]
) -> Union[Tensor, List[Tensor]]:
    r"""Bilinearly resizes saliency maps to the image's original size (the paper's protocol).

    The paper scores maps computed on resized inputs against annotations of the original
    image, so maps are first brought to the annotation's ``(H, W)`` with bilinear interpolation
    (``torch.nn.functional.interpolate``, ``align_corners=False``, no antialiasing).
    Bilinear weights are non-negative, so non-negative maps stay non-negative; the metrics
    normalise by the map's mass, so no renormalisation is needed.

    Args:
        saliency (Tensor): ``(N, h, w)`` or ``(N, 1, h, w)`` maps.
        size (tuple or sequence of tuples): the common ``(H, W)`` of the batch; or one
            ``(H_i, W_i)`` per sample when the original images differ in size.

    Returns:
        Tensor or list of Tensor: with one ``size``, a tensor of the input's layout,
            ``(N, H, W)`` or ``(N, 1, H, W)``; with one size per sample, a list of ``N``
            tensors ``(H_i, W_i)`` (or ``(1, H_i, W_i)``).

    Raises:
        ValueError: a bad shape or ``size``.

    Examples:
        >>> cam = torch.rand(4, 1, 7, 7)
        >>> resize_saliency(cam, (224, 224)).shape
        torch.Size([4, 1, 224, 224])
        >>> [m.shape for m in resize_saliency(cam[:2, 0], [(375, 500), (333, 500)])]
        [torch.Size([375, 500]), torch.Size([333, 500])]
    """
    if not isinstance(saliency, Tensor) or not (
        saliency.dim() == 3 or (saliency.dim() == 4 and saliency.shape[1] == 1)
    ):
        raise ValueError(
            "saliency must be a tensor of shape (N, h, w) or (N, 1, h, w), got "
            f"{tuple(saliency.shape) if isinstance(saliency, Tensor) else type(saliency).__name__}"
        )
    squeeze = saliency.dim() == 3
    maps = saliency.unsqueeze(1) if squeeze else saliency
    if not maps.dtype.is_floating_point:
        maps = maps.float()
    per_sample = (
        isinstance(size, (list, tuple))
        and len(size) > 0
        and all(isinstance(s, (list, tuple, torch.Size)) for s in size)
    )
    if not per_sample:
        out = F.interpolate(maps, size=_check_size(size), mode="bilinear", align_corners=False)
        return out.squeeze(1) if squeeze else out
    if len(size) != maps.shape[0]:
        raise ValueError(f"size must give one (H, W) per sample ({maps.shape[0]}), got {len(size)}")
    sizes = [_check_size(s, f"size[{i}]") for i, s in enumerate(size)]
    # Output shapes differ, so this is one interpolation per distinct size (a loop over sizes,
    # batched over the samples that share one).
    out: List[Tensor] = [maps.new_empty(0)] * len(sizes)
    for target in dict.fromkeys(sizes):
        index = [i for i, s in enumerate(sizes) if s == target]
        resized = F.interpolate(maps[index], size=target, mode="bilinear", align_corners=False)
        for j, i in enumerate(index):
            out[i] = resized[j, 0] if squeeze else resized[j]
    return out
