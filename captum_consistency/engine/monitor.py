r"""Watching a GC training run in TensorBoard: a Grad-CAM panel and localisation scalars per epoch.

* :class:`GradCamPanels` -- a fixed set of validation images and their 2x2 composites (chosen
  once, the same every epoch), explained with Grad-CAM after every epoch and drawn by
  :func:`captum_consistency.viz.gradcam_panel`, under the TensorBoard tags
  :data:`PANEL_TAGS` (``gradcam/images``, ``gradcam/composites``). Each row names the image
  (its index in the validation set) and its class, the map column names the method and epoch:
  a user sees the maps tighten as training goes on.
* :func:`validation_scalars` -- the interpretation metrics of a fixed validation subset,
  ``name -> value``: NQH always, PG and CH when the data set has boxes or masks. One dict, so
  that a further model-level measure is one more entry.

``recipes/train.py`` uses both (``--log-images``, ``--log-subset``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from captum_consistency.composition import compose_grid
from captum_consistency.data import gather_distractors, in_batch_distractors, sample_present_classes
from captum_consistency.engine.batches import as_train_batch
from captum_consistency.engine.evaluation import SaliencyExplainer, evaluate_interpretations

__all__ = ["PANEL_TAGS", "GradCamPanels", "fixed_indices", "validation_scalars"]

#: TensorBoard image tags of :meth:`GradCamPanels.log`: the single validation images and their
#: 2x2 composites, one panel each per epoch (step = the epoch number).
PANEL_TAGS = {"images": "gradcam/images", "composites": "gradcam/composites"}

# Images drawn at most as distractors of the panel's composites (with the panel's own).
_POOL = 32


def fixed_indices(length: int, count: int) -> List[int]:
    """``count`` indices spread evenly over ``range(length)`` (the same ones every call).

    Args:
        length (int): size of the data set.
        count (int): how many (clamped to ``length``).

    Returns:
        list of int: increasing indices, first ``0``.

    Examples::

        >>> fixed_indices(10, 4)
        [0, 3, 6, 9]
    """
    count = max(0, min(int(count), int(length)))
    if count == 0:
        return []
    return torch.linspace(0, length - 1, count).round().long().unique().tolist()


class GradCamPanels:
    """Grad-CAM panels of fixed validation images and composites, for TensorBoard.

    At construction, ``num_images`` images spread over the validation set are decoded once
    (with up to 32 more, spread likewise, as the pool of distractors); image ``i`` is placed in
    cell ``i % 4`` of a composite whose three other cells are pool images without its class
    (:func:`~captum_consistency.data.in_batch_distractors`, seeded); an image without three
    such pool images has no composite. For multi-label data the
    explained class is one present class, drawn once. :meth:`log` explains both with
    :class:`~captum_consistency.engine.evaluation.SaliencyExplainer` and writes two
    :func:`~captum_consistency.viz.gradcam_panel` images under :data:`PANEL_TAGS`.

    Args:
        dataset (Dataset): the validation set of fixed-size ``S x S`` crops.
        classes (sequence of str): class names.
        mean (sequence of float): the images' normalisation mean (to show them).
        std (sequence of float): its standard deviation.
        num_images (int): rows of each panel (at most ``len(dataset)``).
        collate_fn (callable, optional): the data set's collate function.
        method (str): the registry name of the maps (``"gradcam"``; the GC loss's layer).
        seed (int): seed of the distractors and cells.
        tile (int): side of a panel tile in pixels.

    Attributes:
        indices (list of int): the validation images shown.
        num_composites (int): composites shown (images with three distractors of other
            classes in the pool).

    Examples::

        >>> panels = GradCamPanels(val.dataset, val.classes, val.mean, val.std, num_images=8)
        >>> panels.log(writer, model, epoch=3, device=device)  # gradcam/images, gradcam/composites
    """

    def __init__(self, dataset: Any, classes: Sequence[str], mean: Sequence[float],
                 std: Sequence[float], num_images: int, collate_fn: Optional[Callable] = None,
                 method: str = "gradcam", seed: int = 0, tile: int = 128) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.classes, self.method, self.tile = list(classes), method, tile
        pool = fixed_indices(len(dataset), min(len(dataset), num_images + _POOL))
        shown = fixed_indices(len(pool), num_images)  # positions in the pool
        batch = as_train_batch((collate_fn or torch.utils.data.default_collate)(
            [dataset[i] for i in pool]))
        if batch.images.shape[0] != len(pool):
            raise ValueError("an image of the panel could not be decoded (--skip-corrupt)")
        generator = torch.Generator().manual_seed(seed)
        targets = batch.targets
        explained = sample_present_classes(targets, generator) if targets.dim() == 2 else targets
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        rgb = (batch.images.float() * std_t + mean_t).clamp(0, 1)
        self.indices = [pool[p] for p in shown]
        sel = torch.tensor(shown)
        self.images, self.labels, self.rgb = batch.images[sel], explained[sel], rgb[sel]
        # Composites: the distractors from the pool, the cells i % 4.
        index, valid = in_batch_distractors(targets, explained, generator)
        keep = sel[valid[sel]]
        cells = torch.arange(len(shown))[valid[sel]] % 4
        self.composite_indices = [pool[int(p)] for p in keep]
        self.composite_labels, self.cells = explained[keep], cells
        self.num_composites = len(keep)
        if self.num_composites:
            self.composites = compose_grid(batch.images[keep], batch.images[index[keep]], cells=cells)
            self.composite_rgb = compose_grid(rgb[keep], rgb[index[keep]], cells=cells)

    def _titles(self, indices: Sequence[int], labels: Tensor, cells: Optional[Tensor] = None) -> List[str]:
        titles = [f"#{i} {self.classes[int(c)]}" for i, c in zip(indices, labels)]
        if cells is not None:
            titles = [f"{t}, cell {int(k)}" for t, k in zip(titles, cells)]
        return titles

    @torch.no_grad()
    def panels(self, model: nn.Module, epoch: int, device: torch.device) -> Dict[str, np.ndarray]:
        """The ``(H, W, 3)`` uint8 panels by key of :data:`PANEL_TAGS` (no composites: only
        ``"images"``); puts ``model`` in eval mode."""
        from captum_consistency.viz import gradcam_panel

        model.eval()
        explainer = SaliencyExplainer(model, self.method)
        column = f"{self.method}, epoch {epoch}"
        out = {}
        for key, images, rgb, labels, titles in (
            ("images", self.images, self.rgb, self.labels, self._titles(self.indices, self.labels)),
            ("composites", getattr(self, "composites", None), getattr(self, "composite_rgb", None),
             self.composite_labels,
             self._titles(self.composite_indices, self.composite_labels, self.cells)),
        ):
            if images is None:
                continue
            images, labels = images.to(device), labels.to(device)
            maps = explainer(images, torch.arange(len(labels), device=device), labels)
            panel = gradcam_panel(rgb.permute(0, 2, 3, 1).numpy(), {column: maps.cpu()},
                                  titles=titles, tile=self.tile)
            out[key] = np.asarray(panel)
        return out

    def log(self, writer: Any, model: nn.Module, epoch: int, device: torch.device) -> None:
        """Writes the panels to ``writer`` (a ``SummaryWriter``) at step ``epoch``."""
        for key, image in self.panels(model, epoch, device).items():
            writer.add_image(PANEL_TAGS[key], image, epoch, dataformats="HWC")


def validation_scalars(
    model: nn.Module,
    crop_loader: Any,
    device: torch.device,
    num_classes: int,
    whole_loader: Optional[Any] = None,
    multilabel: bool = False,
    fallback: Optional[Callable[[Tensor], Tensor]] = None,
    distractor_ok: Optional[Tensor] = None,
    seed: int = 0,
    tolerance: float = 15,
    method: str = "gradcam",
    amp: bool = False,
    channels_last: bool = False,
    audit: bool = True,
) -> Dict[str, float]:
    """The interpretation metrics of a fixed validation subset, ``name -> value``.

    :func:`~captum_consistency.engine.evaluation.evaluate_interpretations` on the subset's
    loaders, with the cells and distractors drawn from ``seed`` afresh at every call (the same
    composites every epoch when the loaders are not shuffled): ``"nqh"`` always, ``"pg"`` and
    ``"ch"`` with ``whole_loader`` (whole images with boxes or masks), and with ``audit`` the
    audit's model-level measures of single-label data
    (:func:`~captum_consistency.engine.audit_model`, cells emptied): ``"ablation_share"``, the
    distractors' share of the class's evidence in the output, and ``"own_cell_predicted"``.
    Metrics without a scored sample are left out. A collective under ``torch.distributed``: every rank calls it, with its
    shard of the subset.

    Args:
        model (torch.nn.Module): the classifier (put in eval mode).
        crop_loader (Iterable): the subset's ``S x S`` crops (NQH).
        device (torch.device): where to compute.
        num_classes (int): number of classes.
        whole_loader (Iterable, optional): the subset's whole images with boxes or masks.
        multilabel (bool): multi-hot targets.
        fallback (callable, optional): data-set distractors for rows without three batch mates
            of other classes (:class:`~captum_consistency.data.DistractorFallback`).
        distractor_ok (Tensor, optional): see ``evaluate_interpretations``.
        seed (int): seed of the cells and distractors.
        tolerance (float): PG margin in pixels.
        method (str): registry name of the maps (``"gradcam"``).
        amp (bool): bf16 autocast.
        channels_last (bool): channels-last inputs.
        audit (bool): add the model-level measures (one more forward pass of 5 composites
            per subset image, and one of 2).

    Returns:
        dict: ``{"nqh": ..., "pg": ..., "ch": ..., "ablation_share": ...,
        "own_cell_predicted": ...}`` (floats in [0, 1]).
    """
    generator = torch.Generator().manual_seed(seed)

    def make_distractors(images, targets, gc_targets):
        return gather_distractors(images, targets, gc_targets, generator=generator, fallback=fallback)

    m = evaluate_interpretations(
        model, method, whole_loader, crop_loader, device, num_classes, multilabel=multilabel,
        make_distractors=make_distractors, generator=generator, tolerance=tolerance,
        num_samples=1, num_runs=1, amp=amp, channels_last=channels_last, progress=False,
        distractor_ok=distractor_ok,
    )
    scalars: Dict[str, Optional[float]] = {"nqh": m["nqh"]}
    if whole_loader is not None:
        scalars.update(pg=m["pg"], ch=m["ch"])
    if audit and not multilabel and (distractor_ok is None or bool(distractor_ok.all())):
        scalars.update(_ablation_scalars(model, crop_loader, device, fallback, seed))
    return {name: float(value) for name, value in scalars.items() if value is not None}


def _ablation_scalars(model: nn.Module, crop_loader: Any, device: torch.device,
                      fallback: Optional[Callable[[Tensor], Tensor]], seed: int) -> Dict[str, Optional[float]]:
    """The audit's model-level measures on the subset (cells emptied), summed over ranks:
    ``ablation_share`` and ``own_cell_predicted``."""
    from captum_consistency.builders import gradcam_layer
    from captum_consistency.engine.audit import audit_model
    from captum_consistency.engine.distributed import all_reduce_sum

    generator = torch.Generator().manual_seed(seed + 1)

    def make_distractors(images, targets, gc_targets):
        return gather_distractors(images, targets, gc_targets, generator=generator, fallback=fallback)

    out = audit_model(model, crop_loader, device, layer=gradcam_layer(model),
                      make_distractors=make_distractors, generator=generator,
                      faithfulness_images=0, road_images=0, randomization_images=0,
                      progress=False)
    defined = out["num_composites"] - out["ablation_undefined"]
    sums = torch.tensor([(out["ablation_share"] or 0.0) * defined, defined,
                         (out["own_cell_predicted"] or 0.0) * out["num_composites"],
                         out["num_composites"]], dtype=torch.float64, device=device)
    all_reduce_sum(sums)
    share, n_defined, predicted, n = sums.tolist()
    return {"ablation_share": share / n_defined if n_defined else None,
            "own_cell_predicted": predicted / n if n else None}
