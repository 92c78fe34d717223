r"""Transfer evaluation: the paper's metrics under many explanation methods (Tables 3 and 4).

The paper trains with Grad-CAM in the loss and checks that the gain carries over to methods the
loss never sees (cMWP, Table 3; FullGrad, Table 4). :func:`evaluate_transfer` runs the protocol
of :func:`~captum_consistency.engine.evaluation.evaluate_interpretations` once per method of the
registry (:func:`captum_consistency.attr.get_attribution`) on the same loaders, with the same
composites and the same SPG draws for every method, and returns PG, SPG, CH and NQH per method.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from captum_consistency.attr._registry import METHODS, canonical_name
from captum_consistency.engine.evaluation import evaluate_interpretations

__all__ = ["TRANSFER_METHODS", "evaluate_transfer"]

#: Method lists for :func:`evaluate_transfer`. ``"fast"``: eleven methods across the three
#: libraries that cost one forward and one backward pass per image (or a layer's SVD): the
#: paper's cMWP and FullGrad, Captum's saliency, input x gradient, guided backprop and
#: DeepLift, pytorch-grad-cam's Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM and EigenCAM.
#: ``"all"``: every registry name, including the methods that run tens to hundreds of forward
#: passes per image (SmoothGrad, integrated gradients, occlusion, AblationCAM, ScoreCAM; their
#: cost is measured in docs/benchmarks.md).
TRANSFER_METHODS: Dict[str, Tuple[str, ...]] = {
    "fast": (
        "cmwp",
        "fullgrad",
        "captum:saliency",
        "captum:input-x-gradient",
        "captum:guided-backprop",
        "captum:deeplift",
        "pgc:gradcam",
        "pgc:gradcam++",
        "pgc:xgradcam",
        "pgc:layercam",
        "pgc:eigencam",
    ),
    "all": METHODS,
}

_KEYS = ("pg", "spg_mean", "spg_std", "ch", "nqh", "skipped", "num_images", "num_composites")


def evaluate_transfer(
    model: nn.Module,
    methods: Union[str, Sequence[str]],
    whole_loader: Optional[Any],
    crop_loader: Optional[Any],
    device: torch.device,
    num_classes: int, multilabel: bool = False,
    # the NQH composites
    make_distractors: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
    generator: Optional[torch.Generator] = None, distractor_ok: Optional[Tensor] = None,
    # the pointing games
    spg_generator: Optional[torch.Generator] = None, tolerance: float = 15, num_samples: int = 100,
    num_runs: int = 5,
    # the methods
    layer: Optional[nn.Module] = None, method_options: Optional[Mapping[str, Dict[str, Any]]] = None,
    errors: str = "raise", progress: bool = True,
) -> Dict[str, Dict[str, Any]]:
    r"""PG, SPG, CH and NQH of ``model`` under each of ``methods``, in the form of Tables 3-4.

    Each method is scored by
    :func:`~captum_consistency.engine.evaluation.evaluate_interpretations` on the same loaders.
    The states of ``generator`` (cells, NQH classes) and ``spg_generator`` are restored before
    every method, so that all methods are scored on the same composites with the same SPG draws
    and the rows differ by the method only. For that, the loaders must not shuffle and
    ``make_distractors`` must draw its randomness from ``generator`` only, a
    :class:`~captum_consistency.data.DistractorFallback` included (call it as
    ``fallback(classes, generator)``; with its own stream, the few composites it completes
    would differ between methods). Maps that a method returns all zero, or with NaN (zeroed by the registry),
    are skipped and counted in ``skipped``, as for Grad-CAM.

    Args:
        model (torch.nn.Module): the trained classifier (put in eval mode).
        methods (str or sequence of str): registry names
            (:func:`captum_consistency.attr.available_attributions`), or ``"fast"`` / ``"all"``
            for :data:`TRANSFER_METHODS`.
        whole_loader (Iterable, optional): whole images with masks or boxes (PG, SPG, CH).
        crop_loader (Iterable, optional): fixed-size images (NQH on their composites).
        device (torch.device): where to compute.
        num_classes (int): number of classes.
        multilabel (bool): multi-hot targets.
        make_distractors (Callable, optional): ``(images, targets, gradcam_targets) ->
            (N, 3, C, S, S)``; without it NQH is ``None``.
        generator (torch.Generator, optional): CPU generator of cells and NQH classes.
        spg_generator (torch.Generator, optional): generator of the SPG draws, on ``device``.
        tolerance (float): pointing-game margin in pixels (15, the paper's).
        num_samples (int): SPG draws per map.
        num_runs (int): SPG runs (mean and standard deviation).
        layer (torch.nn.Module, optional): the CAM layer (default: the family's).
        distractor_ok (Tensor, optional): see ``evaluate_interpretations``.
        method_options (Mapping, optional): per-method options of
            :func:`~captum_consistency.attr.get_attribution`, e.g.
            ``{"captum:integrated-gradients": {"n_steps": 16}}``.
        errors (str): ``"raise"``: a method that cannot handle the model stops the run;
            ``"record"``: its row is ``{"error": "<message>"}`` and the others still run.
        progress (bool): tqdm bars.

    Returns:
        dict: registry name -> ``{"pg", "spg_mean", "spg_std", "ch", "nqh", "skipped",
        "num_images", "num_composites", "time_s"}`` (fractions in [0, 1], ``None`` where not
        computable), in the order of ``methods``.

    Raises:
        ValueError: an unknown method name or list, or ``errors`` not ``"raise"``/``"record"``.

    Examples::

        >>> rows = evaluate_transfer(model, "fast", whole_loader, crop_loader, "cpu",
        ...                          num_classes=4, make_distractors=make_distractors,
        ...                          generator=torch.Generator().manual_seed(0))
        >>> rows["pgc:gradcam++"]["pg"], rows["captum:saliency"]["nqh"]
    """
    if isinstance(methods, str):
        if methods not in TRANSFER_METHODS:
            raise ValueError(
                f"methods must be a list of registry names or one of {', '.join(TRANSFER_METHODS)}, "
                f"got {methods!r}"
            )
        methods = TRANSFER_METHODS[methods]
    names = [canonical_name(m) for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"methods lists a method twice: {list(methods)}")
    if errors not in ("raise", "record"):
        raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
    options = {canonical_name(k): dict(v) for k, v in (method_options or {}).items()}
    unused = sorted(set(options) - set(names))
    if unused:
        raise ValueError(f"method_options names methods that are not evaluated: {', '.join(unused)}")
    device = torch.device(device)
    states = [(g, g.get_state()) for g in (generator, spg_generator) if g is not None]
    rows: Dict[str, Dict[str, Any]] = {}
    for name in names:
        for g, state in states:
            g.set_state(state)
        start = time.perf_counter()
        try:
            result = evaluate_interpretations(
                model, name, whole_loader, crop_loader, device, num_classes=num_classes,
                multilabel=multilabel, make_distractors=make_distractors, generator=generator,
                spg_generator=spg_generator, tolerance=tolerance, num_samples=num_samples,
                num_runs=num_runs, progress=progress, layer=layer, distractor_ok=distractor_ok,
                method_options=options.get(name),
            )
        except (ValueError, RuntimeError, TypeError) as error:
            if errors == "raise":
                raise
            rows[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        row = {key: result[key] for key in _KEYS}
        row["time_s"] = round(time.perf_counter() - start, 3)
        rows[name] = row
    return rows
