"""Data sets consumed by the recipes."""

from captum_consistency.data.coco import CocoBatch, CocoMultiLabel, CocoSample, collate_coco_samples
from captum_consistency.data.distractors import (
    DatasetDistractorSampler,
    DatasetWithDistractors,
    DistractorFallback,
    collate_with_distractors,
    gather_distractors,
    in_batch_distractors,
    sample_present_classes,
    shared_composite_groups,
)
from captum_consistency.data.guided import MaskedBatch, MaskedSample, WithTrainingMasks, collate_masked_samples
from captum_consistency.data.imagenet import (
    CorruptImageError,
    ImageBatch,
    ImageNetWithBoxes,
    ImageSample,
    boxes_to_mask,
    collate_image_samples,
    load_rgb,
    parse_voc_xml,
)
from captum_consistency.data.synthetic import SHAPES, SpuriousContextShapes, SyntheticSample
from captum_consistency.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SizeGroupedBatchSampler,
    eval_transform,
    resized_size,
    train_transform,
)

__all__ = [
    "SpuriousContextShapes",
    "SyntheticSample",
    "SHAPES",
    "ImageNetWithBoxes",
    "ImageSample",
    "ImageBatch",
    "collate_image_samples",
    "boxes_to_mask",
    "parse_voc_xml",
    "load_rgb",
    "CorruptImageError",
    "CocoMultiLabel",
    "CocoSample",
    "CocoBatch",
    "collate_coco_samples",
    "in_batch_distractors",
    "gather_distractors",
    "sample_present_classes",
    "shared_composite_groups",
    "DatasetDistractorSampler",
    "DistractorFallback",
    "DatasetWithDistractors",
    "collate_with_distractors",
    "WithTrainingMasks",
    "MaskedSample",
    "MaskedBatch",
    "collate_masked_samples",
    "train_transform",
    "eval_transform",
    "resized_size",
    "SizeGroupedBatchSampler",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
