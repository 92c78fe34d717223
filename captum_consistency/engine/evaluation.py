r"""Batched evaluation with the paper's protocol: accuracy, PG, SPG, CH (whole images), NQH.

Protocol (Pillai & Pirsiavash, AAAI 2021, Sec. 4.3; the authors' TorchRay scripts):

* **PG, SPG, CH** -- each validation image is given *whole*, its short side resized to ``2S``
  (448 for ``S = 224``), no crop. The saliency map of the ground-truth class (every class
  present, for COCO) is resized bilinearly to the image's *original* size and compared with the
  union of that class's boxes (ImageNet, VOC corners, 1-based as TorchRay reads them) or masks
  (COCO). An ImageNet image whose boxes of its class are all ``difficult`` is skipped, as in the
  authors' script; all-zero maps are skipped by the metrics (so are maps that a peer library
  returned with NaN or infinity, which the registry zeroes). Every skip is counted.
* **NQH** -- each validation image, as a fixed-size ``S x S`` crop, is placed in a random cell
  of a ``2S x 2S`` composite with three distractors that do not contain its class (taken from
  the batch, :func:`~captum_consistency.data.gather_distractors`, with a data-set fallback);
  the map of its class on the composite, resized to ``2S x 2S``, is scored by the mass outside
  its cell. For multi-label images the class is drawn among the present ones.
* **Accuracy** -- top-1 (or per-class and overall F1 for multi-label data) on the same ``S x S``
  crops: the standard protocol of each data set.

Batching without changing any number: the authors run a batch size of 1 because whole images
have different sizes. Here the whole-image loader groups images of *identical original size*
(:class:`~captum_consistency.data.SizeGroupedBatchSampler` with ``short_side=None``): they are
resized to identical tensors, so they stack without padding, and their maps are resized back to
one common size in one call. Each image's forward and Grad-CAM are the per-image computation;
only the floating-point summation order of batched convolutions may differ (about 1e-6).
Grad-CAM needs one forward per batch; the classes of a multi-label image are explained by
successive backward passes through the head only (the forward is reused).

The scores are accumulated by the ``torchmetrics`` classes of :mod:`captum_consistency.metrics`
(:class:`~captum_consistency.metrics.PointingGame`, ``StochasticPointingGame``,
``ContentHeatmap``, ``NegativeQuadrantsHeatmap``), whose sum states torchmetrics reduces over
the ``torch.distributed`` processes: every rank gets the data set's numbers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_consistency.attr import (
    LayerRecorder,
    detect_architecture,
    elementwise_grad_cam,
    get_attribution,
    grad_cam,
    score_gradients,
)
from captum_consistency.attr._registry import METHODS, canonical_name, uses_cam_layer
from captum_consistency.builders import gradcam_layer, unwrap_model
from captum_consistency.composition import compose_grid, random_cells
from captum_consistency.engine.distributed import all_reduce_sum, is_main_process
from captum_consistency.data import sample_present_classes
from captum_consistency.engine.batches import as_train_batch
from captum_consistency.metrics import ClassificationMeter
from captum_consistency.metrics import (
    ContentHeatmap,
    NegativeQuadrantsHeatmap,
    PointingGame,
    StochasticPointingGame,
    boxes_to_mask,
)

__all__ = [
    "METHODS",
    "SaliencyExplainer",
    "WholeImagePairs",
    "whole_image_pairs",
    "evaluate_interpretations",
    "distractor_classes_ok",
]


def distractor_classes_ok(targets: Any, num_classes: int) -> Tensor:
    """The classes that have a valid composite: at least three images of the data set lack them.

    A class contained in all but fewer than three images (tiny sets) has no three distractors
    without it; pass the result as ``distractor_ok`` to :func:`evaluate_interpretations`.

    Args:
        targets (sequence or Tensor): ``(N,)`` class ids or ``(N, K)`` multi-hot targets.
        num_classes (int): number of classes.

    Returns:
        Tensor: ``(num_classes,)`` bool.
    """
    contains = torch.as_tensor(targets)
    counts = (contains != 0).sum(0) if contains.dim() == 2 else torch.bincount(
        contains.long(), minlength=num_classes)
    return (contains.shape[0] - counts) >= 3


class SaliencyExplainer:
    """Saliency maps ``(P, 1, h, w)`` for (image, class) pairs of a batch, for every method.

    ``gradcam`` and ``elementwise-gradcam`` run one forward pass per batch with the layer's
    output recorded, and one backward pass through the head per *round* (the ``r``-th class of
    every image), so a multi-label batch costs one forward. The maps are the ReLU'd Grad-CAM
    (Eqs. 1-2) or element-wise Grad-CAM (Eq. 3) at the layer's resolution: numerically Captum's
    ``LayerGradCam`` and :class:`~captum_consistency.attr.LayerElementwiseGradCam` with
    ``relu_attributions=True``. Every other name of
    :func:`captum_consistency.attr.available_attributions` (``cmwp``, ``fullgrad``,
    ``captum:*``, ``pgc:*``) uses :func:`captum_consistency.attr.get_attribution` on the images
    repeated once per pair, at the method's own resolution (``upsample=False``: the caller
    resizes once).

    Args:
        model (torch.nn.Module): the classifier in eval mode.
        method (str): one of :data:`METHODS` (the registry's names).
        layer (torch.nn.Module, optional): the Grad-CAM / CAM layer (default: the family's,
            :func:`~captum_consistency.builders.gradcam_layer`); cMWP and methods without a
            layer ignore it.
        amp (bool): bf16 autocast for the forward pass of the Grad-CAM methods (maps are
            computed in float32).
        options (dict, optional): the method's options (:func:`~captum_consistency.attr.get_attribution`).
    """

    def __init__(self, model: nn.Module, method: str, layer: Optional[nn.Module] = None,
                 amp: bool = False, options: Optional[Dict[str, Any]] = None) -> None:
        method = canonical_name(method)
        self.model = model
        self.method = method
        self.amp = amp
        self._attribution = None
        if method in ("gradcam", "elementwise-gradcam") and not options:
            if layer is None and detect_architecture(unwrap_model(model)) == "vit":
                get_attribution(method, unwrap_model(model))  # the registry's error for ViTs
            self.layer = layer if layer is not None else gradcam_layer(model)
        else:
            kwargs: Dict[str, Any] = dict(options or {})
            if layer is not None and uses_cam_layer(method):
                kwargs["layer"] = layer
            self.layer = layer
            self._attribution = get_attribution(method, unwrap_model(model), **kwargs)

    def __call__(self, images: Tensor, image_index: Tensor, classes: Tensor) -> Tensor:
        """Maps of ``classes[p]`` for image ``image_index[p]``.

        Args:
            images (Tensor): ``(N, C, H, W)``.
            image_index (Tensor): ``(P,)`` int64 image of each pair, non-decreasing.
            classes (Tensor): ``(P,)`` int64 class of each pair.

        Returns:
            Tensor ``(P, 1, h, w)`` float32, non-negative.
        """
        if image_index.numel() == 0:
            return images.new_zeros(0, 1, 1, 1)
        if self._attribution is not None:
            maps = self._attribution.attribute(images[image_index], target=classes, upsample=False)
            return maps.detach().float().clamp_(min=0)
        return self._grad_cam(images, image_index, classes)

    def _grad_cam(self, images: Tensor, image_index: Tensor, classes: Tensor) -> Tensor:
        cam = elementwise_grad_cam if self.method == "elementwise-gradcam" else grad_cam
        p = image_index.shape[0]
        # Round of each pair: its rank among the pairs of the same image.
        starts = torch.ones(p, dtype=torch.bool, device=image_index.device)
        starts[1:] = image_index[1:] != image_index[:-1]
        first = torch.cummax(torch.where(starts, torch.arange(p, device=image_index.device), 0), 0)[0]
        rounds = torch.arange(p, device=image_index.device) - first
        num_rounds = int(rounds.max()) + 1
        with torch.enable_grad(), LayerRecorder(self.layer) as recorder:
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.model(images)
            acts = recorder.pop()
            maps: Optional[Tensor] = None
            for r in range(num_rounds):
                sel = (rounds == r).nonzero().squeeze(1)
                (grads,) = score_gradients(
                    logits, acts, classes[sel], rows=image_index[sel], retain_graph=r + 1 < num_rounds
                )
                m = cam(acts[image_index[sel]].detach().float(), grads[image_index[sel]].float())
                if maps is None:
                    maps = m.new_empty((p,) + tuple(m.shape[1:]))
                maps[sel] = m
        assert maps is not None
        return maps


class WholeImagePairs:
    """The (image, class, mask) pairs of a whole-image batch; all images share one size.

    Attributes:
        images: ``(N, C, h, w)`` on the device.
        size: original ``(H, W)`` of every image of the batch.
        image_index: ``(P,)`` image of each pair.
        classes: ``(P,)`` class of each pair.
        masks: ``(P, H, W)`` bool object masks at the original size.
        skipped: images dropped before scoring (undecodable, all boxes difficult).
    """

    def __init__(self, images, size, image_index, classes, masks, skipped):
        self.images, self.size = images, size
        self.image_index, self.classes, self.masks = image_index, classes, masks
        self.skipped = skipped


def whole_image_pairs(batch: Any, device: torch.device, channels_last: bool = False) -> WholeImagePairs:
    """Unpacks a whole-image batch of ImageNet, COCO or synthetic data into pairs.

    * :class:`~captum_consistency.data.ImageBatch`: one pair per image (its label), mask = union
      of its boxes (1-based VOC corners); images whose boxes are all ``difficult`` are dropped
      and counted, as in the authors' evaluation.
    * :class:`~captum_consistency.data.CocoBatch`: one pair per present category, its union
      mask.
    * batched :class:`~captum_consistency.data.SyntheticSample`: one pair per image, the exact
      object mask.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    skipped = int(getattr(batch, "skipped", 0))
    if hasattr(batch, "boxes"):  # ImageBatch
        images, sizes = batch.images, batch.sizes
        keep = [i for i, d in enumerate(batch.difficult) if d.numel() and not bool(d.all())]
        skipped += len(batch.difficult) - len(keep)
        if not keep:
            return WholeImagePairs(images[:0].to(device), (1, 1), *([torch.zeros(0, dtype=torch.long, device=device)] * 2),
                                   torch.zeros(0, 1, 1, dtype=torch.bool, device=device), skipped)
        size = _common_size(sizes[keep])
        images = images[keep].to(device, non_blocking=True, memory_format=fmt)
        masks = boxes_to_mask([batch.boxes[i].to(device) for i in keep], size, one_based=True)
        classes = batch.targets[keep].to(device)
        index = torch.arange(len(keep), device=device)
        return WholeImagePairs(images, size, index, classes, masks, skipped)
    if hasattr(batch, "mask_labels"):  # CocoBatch
        if batch.masks is None:
            raise ValueError("COCO whole-image evaluation needs CocoMultiLabel(with_masks=True)")
        images = batch.images.to(device, non_blocking=True, memory_format=fmt)
        if images.shape[0] == 0:
            z = torch.zeros(0, dtype=torch.long, device=device)
            return WholeImagePairs(images, (1, 1), z, z, torch.zeros(0, 1, 1, dtype=torch.bool, device=device), skipped)
        size = _common_size(batch.sizes)
        counts = torch.tensor([len(l) for l in batch.mask_labels], dtype=torch.long)
        index = torch.repeat_interleave(torch.arange(len(counts)), counts).to(device)
        classes = torch.cat(list(batch.mask_labels)).to(device)
        masks = torch.cat(list(batch.masks)).to(device)
        return WholeImagePairs(images, size, index, classes, masks, skipped)
    if hasattr(batch, "mask") and hasattr(batch, "label"):  # SyntheticSample batch
        images = batch.image.to(device, non_blocking=True, memory_format=fmt)
        masks = batch.mask.to(device)
        size = tuple(masks.shape[-2:])
        index = torch.arange(images.shape[0], device=device)
        return WholeImagePairs(images, size, index, torch.as_tensor(batch.label).to(device), masks, skipped)
    raise TypeError(f"unsupported whole-image batch type {type(batch).__name__}")


def _common_size(sizes: Tensor) -> Tuple[int, int]:
    distinct = {tuple(int(v) for v in s) for s in sizes}
    if len(distinct) != 1:
        raise ValueError(
            f"a whole-image batch mixes original sizes {sorted(distinct)[:4]}; batch with "
            "SizeGroupedBatchSampler(dataset.original_sizes(), batch_size, short_side=None)"
        )
    return distinct.pop()


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@torch.no_grad()
def evaluate_interpretations(
    model: nn.Module,
    method: str,
    whole_loader: Optional[Any],
    crop_loader: Optional[Any],
    device: torch.device,
    num_classes: int,
    multilabel: bool = False,
    make_distractors: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    spg_generator: Optional[torch.Generator] = None,
    tolerance: float = 15,
    num_samples: int = 100,
    num_runs: int = 5,
    amp: bool = False,
    channels_last: bool = False,
    progress: bool = True,
    layer: Optional[nn.Module] = None,
    distractor_ok: Optional[Tensor] = None,
    method_options: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Accuracy, PG, SPG (mean and std over ``num_runs``), CH and NQH of ``model``.

    Args:
        model (torch.nn.Module): the classifier (it is put in eval mode).
        method (str): a name of :func:`captum_consistency.attr.available_attributions`:
            ``"gradcam"``, ``"elementwise-gradcam"``, ``"cmwp"``, ``"fullgrad"``, ``"captum:*"``
            or ``"pgc:*"``.
        whole_loader (Iterable, optional): whole images grouped by original size (PG, SPG, CH).
        crop_loader (Iterable, optional): fixed-size ``S x S`` images (accuracy and NQH).
        device (torch.device): where to compute.
        num_classes (int): number of classes (per-class PG, F1).
        multilabel (bool): multi-hot targets (F1 instead of top-1).
        make_distractors (Callable, optional): ``(images, targets, gradcam_targets) ->
            (N, 3, C, S, S)``; without it NQH is not computed.
        generator (torch.Generator, optional): CPU generator of cells and NQH classes.
        spg_generator (torch.Generator, optional): generator of the SPG draws, on ``device``.
        tolerance, num_samples, num_runs: PG/SPG parameters (15 px, 100 draws, 5 runs).
        amp (bool): bf16 autocast for forward passes.
        channels_last (bool): channels-last inputs (CUDA).
        progress (bool): tqdm bars on rank 0.
        layer (torch.nn.Module, optional): Grad-CAM / CAM layer override.
        distractor_ok (Tensor, optional): ``(num_classes,)`` bool, False for the classes that
            fewer than three images of the data set lack (no valid composite exists); their
            samples are left out of NQH and counted in ``skipped``.
        method_options (dict, optional): options of the method
            (:func:`captum_consistency.attr.get_attribution`, e.g. ``{"n_steps": 16}``).

    Returns:
        dict with ``top1`` (or ``f1_per_class``, ``f1_overall``), ``pg``, ``spg_mean``,
        ``spg_std``, ``ch``, ``nqh``, ``skipped`` (everything not scored: undecodable images,
        all-difficult boxes, degenerate maps or masks) and its breakdown, ``num_images``,
        ``num_composites``; fractions in [0, 1], ``None`` for what could not be computed.
    """
    from tqdm.auto import tqdm

    model.eval()
    explainer = SaliencyExplainer(model, method, layer=layer, amp=amp, options=method_options)
    # torchmetrics states, summed over the processes at compute()
    pg = PointingGame(num_classes, tolerance=tolerance).to(device)
    spg = StochasticPointingGame(tolerance, num_samples, num_runs, generator=spg_generator,
                                 return_std=True).to(device)
    ch, nqh = ContentHeatmap().to(device), NegativeQuadrantsHeatmap().to(device)
    show = progress and is_main_process()
    dropped = torch.zeros(3, dtype=torch.float64, device=device)  # whole, crop, no distractors
    if distractor_ok is not None:
        distractor_ok = distractor_ok.to(device=device, dtype=torch.bool)

    if whole_loader is not None:
        for batch in tqdm(whole_loader, desc="PG/SPG/CH", disable=not show, leave=False):
            pairs = whole_image_pairs(batch, device, channels_last)
            dropped[0] += pairs.skipped
            if pairs.image_index.numel() == 0:
                continue
            maps = explainer(pairs.images, pairs.image_index, pairs.classes)
            maps = F.interpolate(maps, size=pairs.size, mode="bilinear", align_corners=False)
            maps = maps.clamp_(min=0)
            pg.update(maps, pairs.masks, pairs.classes)
            spg.update(maps, pairs.masks)
            ch.update(maps, pairs.masks)

    meter = ClassificationMeter(torch.device(device), num_classes, multilabel)
    if crop_loader is not None:
        for raw in tqdm(crop_loader, desc="accuracy/NQH", disable=not show, leave=False):
            batch = as_train_batch(raw)
            dropped[1] += batch.skipped
            if batch.images.shape[0] == 0:
                continue
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            images = batch.images.to(device, non_blocking=True, memory_format=fmt)
            targets = batch.targets.to(device, non_blocking=True)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                logits = model(images)
            meter.update(logits.float(), targets)
            if make_distractors is None:
                continue
            n = images.shape[0]
            if multilabel:
                gc_targets = sample_present_classes(targets, generator)
            else:
                gc_targets = targets
            keep = None
            if distractor_ok is not None:
                keep = distractor_ok[gc_targets]
                # -1: draw any distractors for the rows dropped below (keeps the batch whole).
                gc_targets = torch.where(keep, gc_targets, torch.full_like(gc_targets, -1))
            distractors = make_distractors(images, targets, gc_targets)
            cells = random_cells(n, generator=generator, device=device)
            if keep is not None and not bool(keep.all()):
                dropped[2] += int((~keep).sum())
                images, distractors = images[keep], distractors[keep]
                gc_targets, cells, n = gc_targets[keep], cells[keep], int(keep.sum())
                if n == 0:
                    continue
            grid = compose_grid(images, distractors, cells=cells)
            if channels_last:
                grid = grid.contiguous(memory_format=torch.channels_last)
            maps = explainer(grid, torch.arange(n, device=device), gc_targets)
            maps = F.interpolate(maps, size=grid.shape[-2:], mode="bilinear", align_corners=False)
            nqh.update(maps.clamp_(min=0), cells)

    with warnings.catch_warnings():
        # A metric that no batch reached (no whole-image loader, no distractors) is NaN: fine.
        warnings.filterwarnings("ignore", message="The ``compute`` method of metric")
        spg_mean, spg_std = (float(v) for v in spg.compute())
        results = {"pg": float(pg.compute()), "spg_mean": spg_mean, "spg_std": spg_std,
                   "ch": float(ch.compute()), "nqh": float(nqh.compute())}
    with pg.sync_context(), ch.sync_context(), nqh.sync_context():  # every process's counts
        pg_per_class = pg.per_class().cpu()
        num_images, skipped_images = int(ch.count), int(ch.skipped)
        num_composites, skipped_composites = int(nqh.count), int(nqh.skipped)
    all_reduce_sum(dropped)
    cls = meter.result() if crop_loader is not None else {}
    out: Dict[str, Any] = {}
    if multilabel:
        out["f1_per_class"] = cls.get("f1_per_class")
        out["f1_overall"] = cls.get("f1_overall")
    else:
        out["top1"] = cls.get("top1")
    skipped_undecodable = int(dropped[:2].sum())
    no_distractors = int(dropped[2])
    out.update(
        {
            "pg": _nan_to_none(results["pg"]),
            "spg_mean": _nan_to_none(results["spg_mean"]),
            "spg_std": _nan_to_none(results["spg_std"]) if num_images else None,
            "ch": _nan_to_none(results["ch"]),
            "nqh": _nan_to_none(results["nqh"]),
            "skipped": skipped_images + skipped_composites + skipped_undecodable + no_distractors,
            "skipped_detail": {
                "degenerate_maps_or_masks": skipped_images,
                "degenerate_composites": skipped_composites,
                "images_dropped_in_loading": skipped_undecodable,
                "composites_without_distractors": no_distractors,
            },
            "num_images": num_images,
            "num_composites": num_composites,
            "classified_images": int(cls.get("samples", 0)) if cls else 0,
            "pg_per_class": [_nan_to_none(float(v)) for v in pg_per_class.tolist()],
        }
    )
    return out
