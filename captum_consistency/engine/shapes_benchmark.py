"""A classifier evaluated on the procedural shapes benchmark (``recipes/quickstart.py``).

:class:`~captum_consistency.data.SpuriousContextShapes` gives exact object masks and, on its
``spurious-cue`` setting, a context cue with its own mask and class. :func:`evaluate_on_shapes`
runs the paper's evaluation on it (PG, SPG, CH, NQH, top-1, FGSM, the transfer table) and adds
the share of all-zero maps; :func:`cue_statistics` measures how much a model relies on the cue.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from captum_consistency._warnings import CaptumConsistencyWarning
from captum_consistency.composition import cell_rows_cols, compose_grid
from captum_consistency.data import (
    DatasetDistractorSampler,
    DistractorFallback,
    SpuriousContextShapes,
    gather_distractors,
)
from captum_consistency.engine.audit import audit_model
from captum_consistency.engine.distributed import rank_seed
from captum_consistency.engine.evaluation import SaliencyExplainer, evaluate_interpretations
from captum_consistency.engine.transfer import evaluate_transfer
from captum_consistency.metrics import content_heatmap
from captum_consistency.robust import fgsm_accuracy

__all__ = ["cue_statistics", "evaluate_on_shapes", "figure_inputs", "FigureInputs"]


class FigureInputs(NamedTuple):
    """What :func:`figure_inputs` returns for :func:`captum_consistency.viz.gradcam_panel`."""

    rgb: np.ndarray  #: ``(N, H, W, 3)`` uint8 images as shown
    images: Tensor  #: ``(N, 3, H, W)`` normalised model inputs
    classes: Tensor  #: ``(N,)`` the class explained in each row
    boxes: Tensor  #: ``(N, 4)`` object boxes ``(x0, y0, x1, y1)`` in ``rgb`` coordinates
    titles: List[str]  #: row captions
    cue_boxes: Optional[Tensor]  #: ``(N, 4)`` context-cue boxes, or ``None`` (no cue)


def _rate(hits: Tensor, among: Tensor) -> Optional[float]:
    count = int(among.sum())
    return int((hits & among).sum()) / count if count else None


@torch.no_grad()
def cue_statistics(model: nn.Module, loader: Any, device: torch.device,
                   layer: nn.Module) -> Dict[str, Optional[float]]:
    """How much a model follows the context cue of :class:`~captum_consistency.data.SpuriousContextShapes`.

    Args:
        model (torch.nn.Module): the classifier, in eval mode.
        loader (Iterable): batches of the data set's ``with_annotations()`` view (``image``,
            ``label``, ``cue_label``, ``cue_mask``).
        device (torch.device): where to compute.
        layer (torch.nn.Module): the element-wise Grad-CAM layer.

    Returns:
        dict: ``top1_consistent`` and ``top1_conflicting`` (top-1 on the images whose cue is of
        their own class / of another class), ``follows_cue`` (the share of cue-conflicting
        images classified as their cue's class) and ``cue_mass``: the mean content heatmap
        (:func:`~captum_consistency.metrics.content_heatmap`, CH) of the element-wise
        Grad-CAM of the label against the cue's mask. ``None`` where no image counts.
    """
    explainer = SaliencyExplainer(model, "elementwise-gradcam", layer=layer)
    preds, labels, cues, masses = [], [], [], []
    for batch in loader:
        images = batch.image.to(device)
        label = torch.as_tensor(batch.label).to(device)
        preds.append(model(images).argmax(1).cpu())
        maps = explainer(images, torch.arange(images.shape[0], device=device), label)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        masses.append(content_heatmap(maps.clamp_(min=0), batch.cue_mask.to(device)).cpu())
        labels.append(label.cpu())
        cues.append(torch.as_tensor(batch.cue_label))
    pred, label, cue, mass = (torch.cat(t) for t in (preds, labels, cues, masses))
    consistent = label == cue
    mass = mass[~torch.isnan(mass)].double()  # NaN: an all-zero map or an image without cue
    return {
        "top1_consistent": _rate(pred == label, consistent),
        "top1_conflicting": _rate(pred == label, ~consistent),
        "follows_cue": _rate(pred == cue, ~consistent),
        "cue_mass": float(mass.mean()) if mass.numel() else None,
    }


def _distractor_source(test: Any, seed: int, cells_stream: int, fallback_stream: int):
    """``(generator, make_distractors)``: in-batch distractors with a data-set fallback, both
    drawing from one generator seeded from ``seed`` and ``cells_stream``, so that replaying the
    generator (evaluate_transfer does) gives the same composites."""
    generator = torch.Generator().manual_seed(rank_seed(seed, 0, cells_stream))
    fallback = DistractorFallback(
        test, DatasetDistractorSampler(test.targets, seed=rank_seed(seed, 0, fallback_stream),
                                       num_classes=test.num_classes))

    def make_distractors(images, targets, gc_targets):
        return gather_distractors(images, targets, gc_targets, generator=generator,
                                  fallback=lambda classes: fallback(classes, generator))

    return generator, make_distractors


def evaluate_on_shapes(
    model: nn.Module,
    test: Any,
    device: torch.device,
    *,
    layer: nn.Module,
    seed: int = 0,
    fgsm_epsilons: Sequence[float] = (0.0, 1.0, 2.0, 4.0, 8.0),
    transfer: Union[str, Sequence[str]] = "none",
    transfer_images: int = 500,
    audit: bool = False,
    audit_images: int = 500,
    batch_size: int = 250,
    progress: bool = True,
) -> Dict[str, Any]:
    """The paper's evaluation of a classifier on a :class:`~captum_consistency.data.SpuriousContextShapes` test set.

    :func:`~captum_consistency.engine.evaluation.evaluate_interpretations` with element-wise
    Grad-CAM at ``layer`` (PG and SPG with the paper's 15-pixel margin scaled to the image
    side, CH against the exact object masks, NQH on 2x2 composites with distractors from the
    batch and a data-set fallback, top-1), the share of all-zero maps, which the metrics leave
    out, on whole images and on composites, :func:`cue_statistics` when the data set has a
    context cue, FGSM accuracy (:func:`~captum_consistency.robust.fgsm_accuracy`) and, unless
    ``transfer`` is ``"none"``, the rows of the transfer table
    (:func:`~captum_consistency.engine.evaluate_transfer`, the paper's Tables 3 and 4) on the
    first ``transfer_images`` test images, with the same composites for every method, and with
    ``audit`` the measures of :func:`~captum_consistency.engine.audit_model` (did the model
    change, or only its map?) on composites of the first ``audit_images`` test images (cells and
    distractors of their own generator, so that no other number changes), the map measures on
    the first 256 (deletion curves), ``audit_images // 8`` up to 32 (ROAD) and 128
    (randomisation) of them.

    Args:
        model (torch.nn.Module): the classifier, in eval mode.
        test (SpuriousContextShapes): the test split.
        device (torch.device): where to compute.
        layer (torch.nn.Module): the Grad-CAM layer (e.g. ``model.layer4``).
        seed (int): seed of cells, distractors and SPG draws.
        fgsm_epsilons (sequence of float): FGSM strengths on the 0-255 scale.
        transfer (str or sequence of str): methods of the transfer table
            (:data:`~captum_consistency.engine.TRANSFER_METHODS` keys or registry names), or
            ``"none"``.
        transfer_images (int): how many test images (the first ones) the transfer rows score.
        audit (bool): add the audit's measures (``audit`` in the result).
        audit_images (int): how many test images (the first ones) the audit uses.
        batch_size (int): images per batch.
        progress (bool): progress bars.

    Returns:
        dict: ``top1``, ``pg``, ``spg_mean``, ``spg_std``, ``ch``, ``nqh``, ``skipped``,
        ``zero_maps``, ``zero_maps_composite``, ``fgsm`` (``"eps"`` -> top-1); with a cue, the
        keys of :func:`cue_statistics` and ``cue_gap`` (cue-consistent minus cue-conflicting
        top-1); with ``transfer``, ``transfer`` (method -> ``pg``, ``spg_mean``, ``ch``,
        ``nqh``, ``skipped``, or ``error``), ``transfer_time_s`` (method -> seconds) and
        ``transfer_warnings`` (what the methods warned about this model, e.g. a rule that
        only approximates through a global max pool); with ``audit``, ``audit`` (the dict of
        :func:`~captum_consistency.engine.audit_model`) and ``audit_time_s``.
    """
    crop_loader = DataLoader(test, batch_size=batch_size)
    whole_loader = DataLoader(test.with_annotations(), batch_size=batch_size)
    generator, make_distractors = _distractor_source(test, seed, 5, 6)
    common = dict(num_classes=test.num_classes, make_distractors=make_distractors,
                  generator=generator, tolerance=15.0 * test.image_size / 224, layer=layer,
                  progress=progress)
    m = evaluate_interpretations(
        model, "elementwise-gradcam", whole_loader, crop_loader, device,
        spg_generator=torch.Generator(device=device).manual_seed(rank_seed(seed, 0, 7)), **common)
    out = {k: m[k] for k in ("top1", "pg", "spg_mean", "spg_std", "ch", "nqh", "skipped")}
    # All-zero maps (the ReLU'd element-wise Grad-CAM of the class is <= 0 everywhere) are left
    # out of PG/SPG/CH/NQH, as in the paper's metrics; how often they occur is reported here.
    zero_img = m["skipped_detail"]["degenerate_maps_or_masks"]  # synthetic masks are never empty
    zero_cmp = m["skipped_detail"]["degenerate_composites"]
    out["zero_maps"] = zero_img / max(1, zero_img + m["num_images"])
    out["zero_maps_composite"] = zero_cmp / max(1, zero_cmp + m["num_composites"])
    if test.cue_prob > 0:
        out.update(cue_statistics(model, whole_loader, device, layer))
        if out["top1_consistent"] is not None and out["top1_conflicting"] is not None:
            out["cue_gap"] = out["top1_consistent"] - out["top1_conflicting"]
    fgsm = fgsm_accuracy(model, crop_loader, epsilons=fgsm_epsilons, mean=test.mean,
                         std=test.std, device=device, progress=progress)
    out["fgsm"] = {f"{eps:g}": acc for eps, acc in fgsm.items()}
    if audit:
        t0 = time.perf_counter()
        # cells and distractors of their own: the audit changes no other number
        audit_gen, audit_distractors = _distractor_source(test, seed, 10, 11)
        subset = Subset(test, range(min(audit_images, len(test))))
        out["audit"] = audit_model(
            model, DataLoader(subset, batch_size=batch_size), device, layer=layer,
            make_distractors=audit_distractors, generator=audit_gen,
            faithfulness_images=min(256, audit_images), road_images=min(32, audit_images // 8),
            randomization_images=min(128, audit_images), seed=seed,
            progress=progress)
        out["audit_time_s"] = round(time.perf_counter() - t0, 2)
    if transfer == "none":
        return out
    subset = range(min(transfer_images, len(test)))
    generator.manual_seed(rank_seed(seed, 0, 8))
    # A method that only approximates its rule on this model (DeepLift through a global max
    # pool) warns; the warning goes into the result, next to its row, instead of the log.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CaptumConsistencyWarning)
        rows = evaluate_transfer(
            model, transfer, DataLoader(Subset(test.with_annotations(), subset), batch_size=batch_size),
            DataLoader(Subset(test, subset), batch_size=batch_size), device,
            spg_generator=torch.Generator(device=device).manual_seed(rank_seed(seed, 0, 9)),
            errors="record", **common)
    for w in caught:
        if not issubclass(w.category, CaptumConsistencyWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out["transfer_warnings"] = sorted({str(w.message) for w in caught
                                       if issubclass(w.category, CaptumConsistencyWarning)})
    # the metrics only (each method's time and image counts are the same for every seed)
    out["transfer"] = {name: ({k: row[k] for k in ("pg", "spg_mean", "ch", "nqh", "skipped")}
                              if "error" not in row else {"error": row["error"]})
                       for name, row in rows.items()}
    out["transfer_time_s"] = {name: row.get("time_s") for name, row in rows.items()}
    return out


def figure_inputs(test: SpuriousContextShapes, count: int) -> Optional[FigureInputs]:
    """The inputs of the quickstart's Figure-2-style panel
    (:func:`captum_consistency.viz.gradcam_panel`) from a test set.

    With a context cue (``test.cue_prob > 0``): single test images, cue-conflicting and
    cue-consistent alternating, with their object and cue boxes. Without: 2x2 composites of
    test images, the explained image ``i`` in cell ``i % 4`` beside the next three test images
    of other classes, with its object's box in composite coordinates.

    Args:
        test (SpuriousContextShapes): the test set.
        count (int): rows of the panel (at most ``len(test)``).

    Returns:
        FigureInputs, or ``None`` when the test set has too few images of other classes to
        fill the composites.
    """
    count = min(count, len(test))
    if test.cue_prob > 0:
        conflicting = test.conflicting_indices().tolist()
        consistent = test.consistent_indices().tolist()
        with_cue = set(conflicting) | set(consistent)
        others = [i for i in range(len(test)) if i not in with_cue]
        picks: List[int] = []
        while len(picks) < count:
            pools = [q for q in ((conflicting, consistent) if len(picks) % 2 == 0
                                 else (consistent, conflicting)) + (others,) if q]
            picks.append(pools[0].pop(0))
        samples = [test.sample(i) for i in picks]
        rgb = np.stack([test.rgb(i) for i in picks])
        titles = [f"{test.classes[s.label]} / "
                  f"{test.classes[s.cue_label] if s.cue_label >= 0 else 'no cue'}" for s in samples]
        return FigureInputs(rgb, torch.stack([s.image for s in samples]),
                            torch.tensor([s.label for s in samples]),
                            torch.stack([s.box for s in samples]), titles,
                            torch.stack([s.cue_box for s in samples]))
    labels = test.targets
    rows, cells, others = [], [], []
    for i in range(count):
        rows.append(i)
        cells.append(i % 4)
        others.append([j for j in range(count, len(test)) if labels[j] != labels[i]][i:i + 3])
    if any(len(o) < 3 for o in others):
        return None
    def stack(idx):  # noqa: E306
        return torch.stack([test[j][0] for j in idx])
    images = stack(rows)
    distractors = torch.stack([stack(o) for o in others])
    cell_t = torch.tensor(cells)
    composite = compose_grid(images, distractors, cells=cell_t)
    rgb_single = torch.from_numpy(np.stack([test.rgb(j) for j in rows])).permute(0, 3, 1, 2)
    rgb_dis = torch.stack([torch.from_numpy(np.stack([test.rgb(j) for j in o])).permute(0, 3, 1, 2)
                           for o in others])
    rgb = compose_grid(rgb_single, rgb_dis, cells=cell_t).permute(0, 2, 3, 1).numpy()
    size = test.image_size
    boxes = torch.stack([test.sample(j).box for j in rows])
    row, col = cell_rows_cols(cell_t)
    offset = torch.stack([col * size, row * size] * 2, dim=1)  # (x0, y0, x1, y1) of the cell
    titles = [f"{test.classes[labels[j]]}, cell {k}" for j, k in zip(rows, cells)]
    return FigureInputs(rgb, composite, torch.tensor([labels[j] for j in rows]), boxes + offset,
                        titles, None)
