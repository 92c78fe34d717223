"""Training images with their object masks, for the mask- and box-guided explanation losses.

The losses of :mod:`captum_consistency.losses.guided` compare an attribution with the object's
mask *in the training crop*, so the mask must go through the same random resized crop and flip
as the image. :class:`WithTrainingMasks` does this with :mod:`torchvision.transforms.v2`, which
applies one draw to an image and a :class:`~torchvision.tv_tensors.Mask` together:

* ImageNet (:class:`~captum_consistency.data.ImageNetWithBoxes` with the training split's
  ILSVRC box XMLs): the union of the boxes of the image's class, rasterised at the original
  size (:func:`~captum_consistency.data.boxes_to_mask`, 1-based VOC corners); an image without
  a box gets an empty mask, which the losses skip and count (ILSVRC has boxes for part of the
  training set only);
* COCO (:class:`~captum_consistency.data.CocoMultiLabel` with ``with_masks=True``): one
  category present in the image is drawn uniformly, its union mask is the mask and the
  category is the regularised class (``gradcam_targets``);
* the shapes benchmark (:class:`~captum_consistency.data.SpuriousContextShapes` with
  annotations): the object's exact pixel mask, no transform (the images are generated at
  their size).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from captum_consistency.data.coco import CocoMultiLabel, CocoSample
from captum_consistency.data.imagenet import ImageNetWithBoxes, ImageSample
from captum_consistency.data.synthetic import SpuriousContextShapes, SyntheticSample
from captum_consistency.data.transforms import IMAGENET_MEAN, IMAGENET_STD, _check_image_size
from captum_consistency.metrics import boxes_to_mask

__all__ = ["MaskedSample", "MaskedBatch", "WithTrainingMasks", "collate_masked_samples"]


class MaskedSample(NamedTuple):
    """One training image with its object mask (:class:`WithTrainingMasks`).

    Attributes:
        image (Tensor): ``(3, S, S)`` float32, normalised.
        target: the class index, or the ``(K,)`` multi-hot target (COCO).
        mask (Tensor): ``(S, S)`` bool, the object of ``gradcam_target`` in the crop.
        gradcam_target (int): the class whose attribution is guided.
    """

    image: Tensor
    target: object
    mask: Tensor
    gradcam_target: int


class MaskedBatch(NamedTuple):
    """A batch of :class:`MaskedSample` (:func:`collate_masked_samples`).

    Attributes:
        images (Tensor): ``(N, 3, S, S)``.
        targets (Tensor): ``(N,)`` or ``(N, K)``.
        masks (Tensor): ``(N, S, S)`` bool.
        gradcam_targets (Tensor): ``(N,)`` int64.
        skipped (int): undecodable images dropped.
    """

    images: Tensor
    targets: Tensor
    masks: Tensor
    gradcam_targets: Tensor
    skipped: int = 0


def collate_masked_samples(batch: Sequence[Optional[MaskedSample]]) -> MaskedBatch:
    """Stacks :class:`MaskedSample`; ``None`` (undecodable images) are dropped and counted.

    Examples::

        >>> loader = DataLoader(WithTrainingMasks(ds, 224), batch_size=32,
        ...                     collate_fn=collate_masked_samples)
    """
    kept = [s for s in batch if s is not None]
    if not kept:
        empty = torch.empty(0, dtype=torch.long)
        return MaskedBatch(torch.empty(0), empty, torch.empty(0, dtype=torch.bool), empty, len(batch))
    targets = [s.target for s in kept]
    return MaskedBatch(
        images=torch.stack([s.image for s in kept]),
        targets=torch.stack(targets) if isinstance(targets[0], Tensor) else torch.tensor(targets),
        masks=torch.stack([s.mask for s in kept]),
        gradcam_targets=torch.tensor([int(s.gradcam_target) for s in kept], dtype=torch.long),
        skipped=len(batch) - len(kept),
    )


class WithTrainingMasks(Dataset):
    """Wraps a data set so that each training sample carries its object mask in the crop.

    The image and its mask go through one draw of the paper's training transform
    (``RandomResizedCrop(S)`` and a horizontal flip, :func:`~captum_consistency.data.train_transform`;
    the mask resized with nearest neighbours), then the image is normalised. See the module
    docstring for what the mask is in each data set.

    Args:
        dataset: an :class:`~captum_consistency.data.ImageNetWithBoxes` built with
            ``boxes_dir`` and ``transform=None``, a
            :class:`~captum_consistency.data.CocoMultiLabel` with ``with_masks=True`` and
            ``transform=None``, or a :class:`~captum_consistency.data.SpuriousContextShapes`
            (its annotated samples are used; no transform).
        image_size (int): ``S``.
        mean (sequence of float): the normalisation's mean (ImageNet's by default).
        std (sequence of float): its standard deviation.

    Attributes:
        targets: the wrapped data set's targets (for samplers).
        classes: its class names.

    Examples::

        >>> train = ImageNetWithBoxes(root, "train", boxes_dir=root + "/boxes/train",
        ...                           on_missing_boxes="empty")
        >>> ds = WithTrainingMasks(train, 224)
        >>> s = ds[0]; s.image.shape, s.mask.shape      # (3, 224, 224), (224, 224)
    """

    def __init__(
        self,
        dataset: Dataset,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if isinstance(dataset, ImageNetWithBoxes):
            if dataset.boxes_dir is None:
                raise ValueError("the ImageNet data set has no boxes: build it with boxes_dir (--boxes)")
        elif isinstance(dataset, CocoMultiLabel):
            if not dataset.with_masks:
                raise ValueError("the COCO data set has no masks: build it with with_masks=True")
        elif not isinstance(dataset, SpuriousContextShapes):
            raise TypeError(
                "WithTrainingMasks takes ImageNetWithBoxes, CocoMultiLabel or SpuriousContextShapes, "
                f"got {type(dataset).__name__}"
            )
        if getattr(dataset, "transform", None) is not None:
            raise ValueError("build the wrapped data set with transform=None: the transform is applied here")
        self.dataset = dataset
        s = _check_image_size(image_size)
        self.transform = v2.Compose([
            v2.RandomResizedCrop(s, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ])
        self.targets = dataset.targets
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Optional[MaskedSample]:
        if isinstance(self.dataset, SpuriousContextShapes):
            s: SyntheticSample = self.dataset.sample(index)
            return MaskedSample(s.image, int(s.label), s.mask.bool(), int(s.label))
        sample = self.dataset[index]
        if sample is None:
            return None
        if isinstance(sample, ImageSample):
            h, w = sample.size
            if sample.boxes.shape[0]:
                mask = boxes_to_mask(sample.boxes, (h, w), one_based=True)
            else:
                mask = torch.zeros(h, w, dtype=torch.bool)
            target, cls = int(sample.target), int(sample.target)
        else:
            assert isinstance(sample, CocoSample)
            h, w = sample.size
            labels = sample.mask_labels
            if labels is None or labels.numel() == 0:
                mask, cls = torch.zeros(h, w, dtype=torch.bool), int(sample.target.argmax())
            else:
                k = int(torch.randint(labels.numel(), (1,)))
                mask, cls = sample.masks[k], int(labels[k])
            target = sample.target
        image, mask = self.transform(tv_tensors.Image(v2.functional.pil_to_tensor(sample.image)),
                                     tv_tensors.Mask(mask[None]))
        return MaskedSample(image.as_subclass(Tensor), target, mask.as_subclass(Tensor)[0].bool(), cls)
