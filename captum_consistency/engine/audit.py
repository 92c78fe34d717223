r"""The audit of a classifier: did training change what the model uses, or only its Grad-CAM?

:func:`audit_model` runs, on one data set, the measures that do not trust the map
(Heo et al., NeurIPS 2019; Adebayo et al., NeurIPS 2018):

* **model level**, on 2x2 composites built as for NQH (each image in a random cell beside three
  distractors without its class): :func:`~captum_consistency.metrics.cell_ablation_share` (the
  share of the class score's positive evidence carried by the distractor cells; 0 is the ideal,
  0.75 a model that reads the four cells alike) and
  :func:`~captum_consistency.metrics.own_cell_removed` (the class probability, and the share of
  composites still given the class, from the distractors alone);
* **faithfulness** of the element-wise Grad-CAM on single images:
  :func:`~captum_consistency.metrics.deletion_curves` (area between LeRF and MoRF) and
  optionally ROAD (:func:`~captum_consistency.metrics.road_score`), each against random maps of
  the same resolution;
* **sanity**: :func:`~captum_consistency.metrics.cascading_randomization`, Spearman's rank
  correlation of the map with the map of the model whose top blocks are re-initialised.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from captum_consistency._modes import eval_mode
from captum_consistency.composition import compose_grid, random_cells
from captum_consistency.data import sample_present_classes
from captum_consistency.engine.batches import as_train_batch
from captum_consistency.engine.distributed import is_main_process
from captum_consistency.engine.evaluation import SaliencyExplainer
from captum_consistency.metrics.ablation import cell_ablation_share, own_cell_removed
from captum_consistency.metrics.faithfulness import deletion_curves, random_maps, road_score
from captum_consistency.metrics.randomization import cascading_randomization

__all__ = ["audit_model", "gradcam_explainer", "AUDIT_KEYS"]

#: The scalar keys of :func:`audit_model`'s result (fractions; correlations in [-1, 1]).
AUDIT_KEYS = (
    "ablation_share", "ablation_share_blur", "own_cell_probability", "own_cell_predicted",
    "intact_probability", "deletion_gradcam", "deletion_random", "road_gradcam", "road_random",
)


def gradcam_explainer(model: nn.Module, layer: nn.Module) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """``explain(m, images, targets) -> (N, 1, h, w)``: the element-wise Grad-CAM of ``m`` at the
    sub-module that has ``layer``'s name in ``model`` (so that it also works on a copy of the
    model, as :func:`~captum_consistency.metrics.cascading_randomization` needs)."""
    names = [name for name, module in model.named_modules() if module is layer]
    if not names:
        raise ValueError(f"the layer {type(layer).__name__} is not a sub-module of the model")
    name = names[0]

    def explain(m: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        explainer = SaliencyExplainer(m, "elementwise-gradcam", layer=m.get_submodule(name))
        return explainer(images, torch.arange(images.shape[0], device=images.device), targets)

    return explain


def _mean(values: List[Tensor]) -> Optional[float]:
    if not values:
        return None
    flat = torch.cat([v.double().flatten() for v in values])
    flat = flat[~torch.isnan(flat)]
    return float(flat.mean()) if flat.numel() else None


def audit_model(
    model: nn.Module,
    crop_loader: Any,
    device: torch.device,
    *,
    layer: nn.Module,
    make_distractors: Callable[[Tensor, Tensor, Tensor], Tensor],
    generator: Optional[torch.Generator] = None,
    multilabel: bool = False,
    max_composites: Optional[int] = None,
    faithfulness_images: int = 256,
    road_images: int = 0,
    randomization_images: int = 128,
    deletion_steps: int = 10,
    seed: int = 0,
    batch_size: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    r"""The audit's measures of one model on one data set (the module's docstring lists them).

    Composites are built from ``crop_loader``'s fixed-size images as for NQH
    (``make_distractors``, cells drawn from ``generator``); the first ``faithfulness_images``,
    ``road_images`` and ``randomization_images`` of those images are also used whole for the
    map measures. For multi-label data the class of each image is drawn among its present ones
    (:func:`~captum_consistency.data.sample_present_classes`), as for NQH.

    Args:
        model (torch.nn.Module): the classifier (evaluated in eval mode; its mode is restored).
        crop_loader (Iterable): batches of ``(images, targets)`` (or the recipes' batches).
        device (torch.device): where to compute.
        layer (torch.nn.Module): the element-wise Grad-CAM layer.
        make_distractors (Callable): ``(images, targets, classes) -> (N, 3, C, S, S)``.
        generator (torch.Generator, optional): CPU generator of cells (and multi-label classes).
        multilabel (bool): multi-hot targets.
        max_composites (int, optional): stop after this many composites.
        faithfulness_images (int): images for the deletion curves (0: none).
        road_images (int): images for ROAD (0: none; pytorch-grad-cam solves one sparse system
            per image and percentile on the CPU).
        randomization_images (int): images for the randomisation check (0: none).
        deletion_steps (int): steps of the deletion curves.
        seed (int): seed of the random maps and the re-initialisation.
        batch_size (int, optional): composites per ablation forward (``4 x`` that many images).
        progress (bool): a tqdm bar on rank 0.

    Returns:
        dict: the :data:`AUDIT_KEYS` (means; ``None`` where nothing was measured), with
        ``ablation_undefined`` (composites whose class score no ablation lowers: left out of the
        share's mean), ``num_composites``, ``num_faithfulness_images``, ``num_road_images`` and
        ``randomization`` (block re-initialised last -> mean Spearman correlation, in order).
    """
    from tqdm.auto import tqdm

    shares: List[Tensor] = []
    shares_blur: List[Tensor] = []
    removed: List[Tensor] = []
    predicted: List[Tensor] = []
    intact: List[Tensor] = []
    undefined = 0
    kept_images: List[Tensor] = []
    kept_classes: List[Tensor] = []
    keep = max(faithfulness_images, road_images, randomization_images)
    count = 0
    with eval_mode(model):
        bar = tqdm(crop_loader, desc="audit", disable=not (progress and is_main_process()), leave=False)
        for raw in bar:
            batch = as_train_batch(raw)
            if batch.images.shape[0] == 0:
                continue
            images = batch.images.to(device)
            targets = batch.targets.to(device)
            classes = sample_present_classes(targets, generator) if multilabel else targets
            if max_composites is not None:
                room = max_composites - count
                if room <= 0:
                    break
                images, targets, classes = images[:room], targets[:room], classes[:room]
            n = images.shape[0]
            distractors = make_distractors(images, targets, classes)
            cells = random_cells(n, generator=generator, device=device)
            grid = compose_grid(images, distractors, cells=cells)
            result = cell_ablation_share(model, grid, cells, classes, batch_size=batch_size)
            shares.append(result.share)
            undefined += int(result.undefined.sum())
            shares_blur.append(cell_ablation_share(model, grid, cells, classes, baseline="blur",
                                                   batch_size=batch_size).share)
            own = own_cell_removed(model, grid, cells, classes, batch_size=batch_size)
            removed.append(own.probability)
            predicted.append(own.predicted)
            intact.append(own.probability_before)
            if sum(x.shape[0] for x in kept_images) < keep:
                kept_images.append(images)
                kept_classes.append(classes)
            count += n
        out: Dict[str, Any] = {
            "ablation_share": _mean(shares),
            "ablation_share_blur": _mean(shares_blur),
            "ablation_undefined": undefined,
            "own_cell_probability": _mean(removed),
            "own_cell_predicted": _mean([p.float() for p in predicted]),
            "intact_probability": _mean(intact),
            "num_composites": count,
        }
        images = torch.cat(kept_images)[:keep] if kept_images else None
        classes = torch.cat(kept_classes)[:keep] if kept_classes else None
        explain = gradcam_explainer(model, layer)
        gen = torch.Generator().manual_seed(seed)
        out.update(deletion_gradcam=None, deletion_random=None, road_gradcam=None, road_random=None,
                   num_faithfulness_images=0, num_road_images=0, randomization={})
        if images is not None and max(faithfulness_images, road_images) > 0:
            m = min(max(faithfulness_images, road_images), images.shape[0])
            chunk = batch_size or 64
            maps = torch.cat([explain(model, images[i:i + chunk], classes[i:i + chunk])
                              for i in range(0, m, chunk)])
            rand = random_maps(maps, generator=gen)

            def deletion(kind: Tensor, f: int) -> float:
                areas = [deletion_curves(model, images[i:min(f, i + chunk)], kind[i:min(f, i + chunk)],
                                         classes[i:min(f, i + chunk)], steps=deletion_steps).area_between
                         for i in range(0, f, chunk)]
                return float(torch.cat(areas).double().mean())

            if faithfulness_images > 0:
                f = min(faithfulness_images, m)
                out["deletion_gradcam"] = deletion(maps, f)
                out["deletion_random"] = deletion(rand, f)
                out["num_faithfulness_images"] = f
            if road_images > 0:
                r = min(road_images, m)
                out["road_gradcam"] = float(road_score(model, images[:r], maps[:r], classes[:r]).mean())
                out["road_random"] = float(road_score(model, images[:r], rand[:r], classes[:r]).mean())
                out["num_road_images"] = r
        if images is not None and randomization_images > 0:
            r = randomization_images
            steps = cascading_randomization(model, images[:r], classes[:r], explain, seed=seed)
            out["randomization"] = {s.block: s.mean() for s in steps}
    return out
