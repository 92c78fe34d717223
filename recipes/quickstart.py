"""CPU quickstart: what the Grad-CAM consistency (GC) loss does, in minutes, with no download.

Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021::

    python recipes/quickstart.py --output-dir runs/quickstart          # make quickstart
    python recipes/quickstart.py --output-dir runs/qs_fast --fast      # under a minute
    python recipes/quickstart.py --benchmark spurious-cue              # what GC does not fix

Trains the paper's variants (Baseline and GC; GMP and GMP + GC with ``--variants``) as
:class:`~captum_consistency.models.SmallResNet` s with ``--seeds`` seeds each on a procedural
benchmark of :class:`~captum_consistency.data.SpuriousContextShapes` (``shapes``: the paper's
claim; ``spurious-cue``: a context cue that GC does not remove), evaluates them with
:func:`~captum_consistency.engine.evaluate_on_shapes` (PG, SPG, CH, NQH, top-1, FGSM and the
transfer table of the paper's Tables 3-4) and writes to ``--output-dir``:

* ``results.json``: per variant the means over seeds of every metric, ``spread`` (their
  standard deviation over seeds), ``per_seed`` and ``num_seeds``; ``lambda_sweep``; ``claims``
  (the paper's claims checked on the means, :func:`~captum_consistency.claims.check_claims`);
  ``transfer`` (per method, GC against its reference,
  :func:`~captum_consistency.claims.transfer_comparison`); ``config``, ``machine``,
  ``elapsed_s`` and ``status``. Rewritten after every trained model, so an interrupted run
  keeps what it finished.
* ``report.md``: whether the baseline learned the object, the Table-1 form table
  (:func:`~captum_consistency.report.table1_markdown`), the claims, the transfer table, the
  lambda sweep and the set-up.
* ``gradcam.png`` (:func:`~captum_consistency.viz.gradcam_panel`) and ``lambda_sweep.png``
  (:func:`~captum_consistency.viz.lambda_sweep_plot`).

Training: SGD (momentum 0.9, Nesterov), a linear warm-up over the first 5% of the steps then a
cosine decay to 0, stepped per batch. The benchmarks, the choice of ``lambda = 8`` and the
measured run are described in ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, default_collate

from captum_consistency import GradCamConsistencyLoss, to_global_max_pool
from captum_consistency.data import (
    SHAPES,
    DatasetDistractorSampler,
    DistractorFallback,
    MaskedBatch,
    SpuriousContextShapes,
    gather_distractors,
)
from captum_consistency.data.synthetic import MIN_IMAGE_SIZE
from captum_consistency.engine import (
    TRANSFER_METHODS,
    evaluate_on_shapes,
    figure_inputs,
    rank_seed,
    train_one_epoch,
)
from captum_consistency.engine.cli import positive_int, recipe_parser, unit_fraction
from captum_consistency.engine.evaluation import SaliencyExplainer
from captum_consistency.losses import EXPLANATION_LOSSES, MASK_LOSSES
from captum_consistency.models import SmallResNet
from captum_consistency.claims import (
    CLAIM_PAIRS,
    LEARNED_TOP1,
    audit_comparison,
    audit_markdown,
    check_claims,
    claims_markdown,
    learned_markdown,
    paper_transfer_markdown,
    sweep_markdown,
    transfer_comparison,
    transfer_markdown,
)
from captum_consistency.report import markdown_table, percent, summarize_seeds, table1_markdown
from captum_consistency.viz import cost_plot, gradcam_panel, lambda_sweep_plot

#: slug -> (display name, global max pooling, GC loss)
VARIANTS: Dict[str, tuple] = {
    "baseline": ("Baseline", False, False),
    "gc": ("GC", False, True),
    "gmp": ("GMP", True, False),
    "gmp_gc": ("GMP + GC", True, True),
    # GC fine-tuning of the same seed's trained baseline (--finetune-epochs, --finetune-lr)
    "gc_finetune": ("GC fine-tuned", False, True),
}

#: The two benchmarks: their defaults of the data and training flags (a flag given on the
#: command line wins). ``shapes`` measures the paper's claim; ``spurious-cue`` (the
#: quickstart's set-up before 0.2) shows what GC does not fix.
BENCHMARKS: Dict[str, Dict[str, Any]] = {
    "shapes": {
        "variants": "baseline,gc,gc_finetune", "cue_prob": 0.0, "stray_cue_prob": 0.0, "cue_strength": 0.25,
        "object_size": (0.2, 0.3), "width": 8, "epochs": 14, "lambda_sweep": "0,0.25,1,4",
        "composites": "shared",
    },
    "spurious-cue": {
        "variants": "baseline,gc,gmp,gmp_gc", "cue_prob": 1.0, "stray_cue_prob": 0.25,
        "cue_strength": 0.9, "object_size": (0.13, 0.25), "width": 16, "epochs": 4,
        "lambda_sweep": "none", "composites": "per-image",
    },
}

#: What ``--fast`` caps (a smoke run of every code path, not a meaningful experiment).
FAST = {
    "seeds": 1, "train_size": 96, "epochs": 1, "batch_size": 32, "test_size": 48,
    "figure_images": 2, "width": 8, "transfer_images": 48,
    "audit_images": 48,
}


#: The pairs whose claims and audit the report reads: the paper's, and the fine-tuned model
#: against its own baseline (it has no transfer table: see :func:`run_job`).
PAIRS = (*CLAIM_PAIRS, ("gc_finetune", "baseline"))

#: The fine-tuning of ``gc_finetune`` on ``shapes``, the best measured setting (docs/results.md,
#: "Fine-tuning and partial GC"): one epoch of warm-up-then-cosine at the from-scratch peak lr,
#: with 8 times the from-scratch lambda.
FINETUNE = {"epochs": 1, "lr": 0.05, "lam": 64.0}


def _epsilons(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"epsilons must be non-negative numbers, got {text!r}")
    return values


def _sweep_factors(text: str) -> List[float]:
    if text.strip().lower() in ("", "none", "off"):
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or 'none', got {text!r}") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"lambda factors must be non-negative numbers, got {text!r}")
    return sorted(set(values))


def _positive_ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_floats(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def get_args_parser() -> argparse.ArgumentParser:
    p = recipe_parser(
        "Train Baseline and GC (and GMP, GMP + GC) small ResNets on a procedural shapes "
        "benchmark on the CPU and report the paper's metrics (Table 1), a lambda sweep and "
        "Grad-CAM overlays (Figure 2). Flags marked 'benchmark' default to the values of "
        "--benchmark.")
    p.add_argument("--output-dir", default="runs/quickstart", help="where results go")
    p.add_argument("--benchmark", default="shapes", choices=tuple(BENCHMARKS),
                   help="shapes: the paper's claim (no context cue); spurious-cue: what GC "
                   "does not fix (a class-correlated cue beside the object)")
    p.add_argument("--fast", action="store_true",
                   help=f"tiny smoke run (under a minute): overrides {', '.join(FAST)}")
    p.add_argument("--seeds", type=positive_int, default=3, help="training seeds per variant")
    p.add_argument("--variants", default=None,
                   help=f"benchmark; comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--lambda-sweep", type=_sweep_factors, default=None, metavar="FACTORS",
                   help="benchmark; multiples of --lam trained with seed 0 and plotted "
                   "(0 = the baseline, 1 = GC: their seed-0 runs are reused), or 'none'")
    g = p.add_argument_group("data")
    g.add_argument("--classes", type=int, default=4, help=f"object classes (2..{len(SHAPES)})")
    g.add_argument("--image-size", type=int, default=32,
                   help=f"image side; a multiple of {SmallResNet.stride} (the network's stride), "
                   f"at least {MIN_IMAGE_SIZE}")
    g.add_argument("--cue-prob", type=float, default=None,
                   help="benchmark; P(an image has a context cue beside the object)")
    g.add_argument("--cue-strength", type=float, default=None,
                   help="benchmark; training P(cue class = object class)")
    g.add_argument("--stray-cue-prob", type=float, default=None,
                   help="benchmark; P(an extra cue of a random class away from the object)")
    g.add_argument("--object-size", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="benchmark; object circumradius range, as a fraction of the image side")
    g.add_argument("--clutter", type=float, default=0.5, help="background clutter in [0, 1]")
    g.add_argument("--train-size", type=positive_int, default=2500, help="training images")
    g.add_argument("--test-size", type=positive_int, default=1000,
                   help="test images (cue independent of the class)")
    g.add_argument("--data-seed", type=int, default=0, help="generator seed (shared by all runs)")
    g = p.add_argument_group("training")
    g.add_argument("--width", type=positive_int, default=None,
                   help="benchmark; channels of layer1 (doubled at each stage)")
    g.add_argument("--epochs", type=positive_int, default=None, help="benchmark")
    g.add_argument("--batch-size", type=positive_int, default=64)
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--lam", type=float, default=8.0, help="GC weight lambda (see the docstring)")
    g.add_argument("--composites", default=None, choices=("shared", "per-image"),
                   help="benchmark; GC composites: one per image (the paper's scheme) or shared "
                   "by the four images they hold (GradCamConsistencyLoss(composites=...))")
    g.add_argument("--detach-target", action="store_true",
                   help="stop the gradient through the single image's map in the GC loss "
                   "(the paper and the authors' code do not)")
    g.add_argument("--layer", default="layer4", choices=("layer3", "layer4"),
                   help="Grad-CAM layer of the GC loss and of the evaluation (the paper: layer4)")
    g = p.add_argument_group("fine-tuning and partial GC (docs/tutorials/finetune.md)")
    g.add_argument("--finetune-epochs", type=positive_int, default=FINETUNE["epochs"],
                   help="gc_finetune: GC epochs on top of the trained baseline")
    g.add_argument("--finetune-lr", type=float, default=FINETUNE["lr"],
                   help="gc_finetune and --finetune-study: peak lr of the fine-tuning cosine "
                        "(5%% warm-up)")
    g.add_argument("--finetune-lam", type=float, default=FINETUNE["lam"],
                   help="gc_finetune: GC weight lambda of the fine-tuning")
    g.add_argument("--finetune-study", action="store_true",
                   help="instead of --variants: baseline, GC, GC fine-tuning of each seed's "
                        "baseline for --study-epochs epochs and partial GC from scratch "
                        "(--study-every, --study-fraction); writes finetune-results.json, "
                        "finetune_cost.png and report.md")
    g.add_argument("--study-epochs", type=_positive_ints, default=[1, 2, 4], metavar="E,E",
                   help="fine-tuning lengths of --finetune-study")
    g.add_argument("--study-lrs", type=_positive_floats, default=None, metavar="LR,LR",
                   help="fine-tuning lrs of --finetune-study (default: --finetune-lr)")
    g.add_argument("--study-lams", type=_positive_floats, default=None, metavar="L,L",
                   help="fine-tuning lambdas of --finetune-study (default: --lam)")
    g.add_argument("--study-settings", default="finetune,gc,every,fraction",
                   help="what --finetune-study trains besides the baseline: a subset of "
                        "finetune, gc, every, fraction")
    g.add_argument("--study-every", type=positive_int, default=4, metavar="K",
                   help="partial GC of --finetune-study: the GC loss on every K-th step")
    g.add_argument("--study-fraction", type=unit_fraction, default=0.25, metavar="P",
                   help="partial GC of --finetune-study: the GC loss on a fraction P of each batch")
    g = p.add_argument_group("explanation-guided losses (docs/losses.md)")
    g.add_argument("--losses", nargs="?", const="all", default=None, metavar="NAMES",
                   help="instead of the variants, the losses study: the baseline and every loss "
                   f"({', '.join(EXPLANATION_LOSSES)}; or the comma-separated NAMES) at its "
                   "default lambda and at --losses-factor times it, --seeds seeds each; writes "
                   "losses-results.json and report.md")
    g.add_argument("--losses-factor", type=float, default=4.0, metavar="F",
                   help="--losses: the other lambda of each loss, F times its default")
    g = p.add_argument_group("evaluation")
    g.add_argument("--fgsm-eps", type=_epsilons, default=[0.0, 1.0, 2.0, 4.0, 8.0],
                   help="FGSM epsilons on the 0-255 scale")
    g.add_argument("--figure-images", type=positive_int, default=6, help="rows of gradcam.png")
    g.add_argument("--transfer", default="fast", choices=("none", *TRANSFER_METHODS),
                   help="explanation methods of the transfer table (the paper's Tables 3-4): "
                        "'fast' (one or a few passes per image), 'all' (every registry name, "
                        "tens to hundreds of passes per image for some) or 'none'")
    g.add_argument("--transfer-images", type=positive_int, default=500,
                   help="test images (the first ones) scored under each transfer method")
    g.add_argument("--audit-images", type=int, default=500, metavar="N",
                   help="test images (the first N) whose 2x2 composites the audit ablates, "
                        "\"Did the model change, or only its map?\" (0: no audit); the map measures "
                        "use the first 256 (deletion), N/8 up to 32 (ROAD) and 128 (randomisation) of them")
    g.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="models trained at once, each in its own one-thread process (a small "
                   "network cannot keep several threads busy; processes on separate cores "
                   "scale where threads do not)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads per worker (default: 1 with several workers, "
                   "else all cores)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and validates the options; bad values exit with an argparse error (status 2)
    before anything is trained."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for key, value in BENCHMARKS[args.benchmark].items():
        if getattr(args, key) is None:
            setattr(args, key, _sweep_factors(value) if key == "lambda_sweep" else value)
    args.object_size = tuple(args.object_size)
    if args.fast:
        for key, value in FAST.items():
            setattr(args, key, min(getattr(args, key), value))
        args.fgsm_eps = args.fgsm_eps[:2]
    if not 2 <= args.classes <= len(SHAPES):
        parser.error(f"--classes must be between 2 and {len(SHAPES)}, got {args.classes}")
    stride = SmallResNet.stride
    if args.image_size < max(MIN_IMAGE_SIZE, 2 * stride) or args.image_size % stride:
        parser.error(
            f"--image-size must be a multiple of the network's stride {stride} and at least "
            f"{max(MIN_IMAGE_SIZE, 2 * stride)} (layer4 maps of at least 2x2; the generator "
            f"draws at least {MIN_IMAGE_SIZE} px), got {args.image_size}"
        )
    for flag in ("cue_prob", "cue_strength", "stray_cue_prob", "clutter"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            parser.error(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")
    lo, hi = args.object_size
    if not 0.05 <= lo <= hi <= 0.45:
        parser.error(f"--object-size must satisfy 0.05 <= MIN <= MAX <= 0.45, got {lo:g} {hi:g}")
    if args.cue_prob > 0 and hi > 0.25:
        parser.error(f"--object-size MAX {hi:g} leaves no room for the context cue: use at most "
                     "0.25 or --cue-prob 0")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not (args.lam >= 0 and math.isfinite(args.lam)):
        parser.error(f"--lam must be a non-negative number, got {args.lam}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        parser.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not (args.finetune_lr > 0 and math.isfinite(args.finetune_lr)):
        parser.error(f"--finetune-lr must be a positive number, got {args.finetune_lr}")
    if not (args.finetune_lam >= 0 and math.isfinite(args.finetune_lam)):
        parser.error(f"--finetune-lam must be a non-negative number, got {args.finetune_lam}")
    if args.batch_size < 4:
        parser.error(f"--batch-size must be at least 4 (three distractors per image), got {args.batch_size}")
    if args.train_size < args.batch_size:
        parser.error(f"--train-size ({args.train_size}) must be at least --batch-size ({args.batch_size})")
    if args.data_seed < 0:
        parser.error(f"--data-seed must be >= 0, got {args.data_seed}")
    if args.audit_images < 0:
        parser.error(f"--audit-images must be >= 0 (0: no audit), got {args.audit_images}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown:
        parser.error(f"--variants must be a subset of {', '.join(VARIANTS)}, got {args.variants!r}")
    args.variants = variants
    settings = [v.strip() for v in args.study_settings.split(",") if v.strip()]
    if not set(settings) <= {"finetune", "gc", "every", "fraction"}:
        parser.error(f"--study-settings must be a subset of finetune, gc, every, fraction, "
                     f"got {args.study_settings!r}")
    args.study_settings = settings
    if args.losses is not None:
        names = list(EXPLANATION_LOSSES) if args.losses.strip() == "all" else [
            n.strip() for n in args.losses.split(",") if n.strip()]
        if not names or not set(names) <= set(EXPLANATION_LOSSES):
            parser.error(f"--losses must be 'all' or a subset of {', '.join(EXPLANATION_LOSSES)}, "
                         f"got {args.losses!r}")
        if args.finetune_study:
            parser.error("--losses and --finetune-study are two studies: run them one at a time")
        args.losses = names
    if not (args.losses_factor > 0 and math.isfinite(args.losses_factor)) or args.losses_factor == 1:
        parser.error(f"--losses-factor must be a positive number other than 1, got {args.losses_factor}")
    args.study_lrs = args.study_lrs or [args.finetune_lr]
    args.study_lams = args.study_lams or [args.lam]
    if args.threads is None:
        args.threads = 1 if args.workers > 1 else (os.cpu_count() or 1)
    return args


# ------------------------------------------------------------------------------------ pieces


def _render(dataset: SpuriousContextShapes, progress: bool, desc: str, workers: int = 0):
    """Renders a split once into ``(images, labels)`` tensors (shared by all runs)."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=256, num_workers=workers if workers > 1 else 0)
    images, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def build_model(num_classes: int, width: int, gmp: bool) -> SmallResNet:
    model = SmallResNet(num_classes, widths=(width, 2 * width, 4 * width, 8 * width))
    if gmp:
        to_global_max_pool(model)
    return model


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int):
    """Per-step schedule: linear warm-up over the first 5% of the steps, from ``lr / warmup``
    to ``lr``, then a cosine decay to 0 over the rest."""
    warmup = max(1, round(0.05 * total_steps))
    sched = torch.optim.lr_scheduler
    return sched.SequentialLR(optimizer, [
        sched.LinearLR(optimizer, start_factor=1 / warmup, total_iters=max(1, warmup - 1)),
        sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup)),
    ], milestones=[warmup])


def train_model(args, variant: str, seed: int, train_images, train_labels, device,
                lam: Optional[float] = None, init_state: Optional[Dict[str, Tensor]] = None,
                epochs: Optional[int] = None, lr: Optional[float] = None, gc_every: int = 1,
                gc_fraction: float = 1.0, loss: Optional[str] = None,
                train_masks: Optional[Tensor] = None) -> Dict[str, Any]:
    """Trains one variant with one seed (GC weight ``lam``, default ``args.lam``); returns the
    model and training statistics. ``init_state`` (fine-tuning) starts from a trained model's
    weights, ``epochs`` and ``lr`` replace ``args.epochs`` and ``args.lr``, ``gc_every`` and
    ``gc_fraction`` are :func:`~captum_consistency.engine.train_one_epoch`'s partial GC.
    ``loss`` trains with another loss of :data:`~captum_consistency.losses.EXPLANATION_LOSSES`
    (weight ``lam``) instead of the variant's; the mask-guided ones read ``train_masks``.
    ``images`` in the result counts the images forwarded and backpropagated (a composite
    counts four)."""
    _, gmp, gc = VARIANTS[variant]
    lam = args.lam if lam is None else lam
    epochs = args.epochs if epochs is None else epochs
    lr = args.lr if lr is None else lr
    torch.manual_seed(rank_seed(seed, 0, 1))
    model = build_model(args.classes, args.width, gmp).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    train_set = TensorDataset(train_images, train_labels)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(rank_seed(seed, 0, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    scheduler = warmup_cosine(optimizer, epochs * len(loader))
    generator = torch.Generator().manual_seed(rank_seed(seed, 0, 3))
    loss_fn = make_distractors = None
    if gc:
        loss_fn = GradCamConsistencyLoss(model, getattr(model, args.layer), lam=lam, composites=args.composites,
                                         detach_target=args.detach_target)
        fallback = DistractorFallback(
            train_set, DatasetDistractorSampler(train_labels, seed=rank_seed(seed, 0, 4),
                                                num_classes=args.classes))

        def make_distractors(images, targets, gc_targets):
            return gather_distractors(images, targets, gc_targets, generator=generator,
                                      fallback=fallback)

    if loss is not None and loss != "gc":
        loss_fn = EXPLANATION_LOSSES[loss](model, getattr(model, args.layer), lam=lam)
        if loss in MASK_LOSSES:
            if train_masks is None:
                raise ValueError(f"--losses {loss} needs the training masks")
            loader = DataLoader(TensorDataset(train_images, train_labels, train_masks),
                                batch_size=args.batch_size, shuffle=True, drop_last=True,
                                generator=torch.Generator().manual_seed(rank_seed(seed, 0, 2)),
                                collate_fn=_masked_batch)
    t0 = time.perf_counter()
    history = []
    images = 0
    for epoch in range(epochs):
        stats = train_one_epoch(
            model, optimizer, loader, device, epoch, criterion=torch.nn.CrossEntropyLoss(),
            loss_fn=loss_fn, make_distractors=make_distractors, generator=generator,
            log_every=10, progress=not args.no_progress, lr_scheduler=scheduler,
            gc_every=gc_every, gc_fraction=gc_fraction,
        )
        history.append({k: stats[k] for k in ("loss", "classification", "consistency", "top1")
                        if k in stats})
        images += int(stats["samples"]) + 4 * int(stats.get("composites", 0))
    return {"model": model.eval(), "train_time_s": time.perf_counter() - t0, "history": history,
            "images": images}


# ----------------------------------------------------------------------------------- reports


def _masked_batch(samples) -> MaskedBatch:
    images, labels, masks = default_collate(samples)
    return MaskedBatch(images, labels, masks, labels)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _sweep_points(args, runs: Dict[str, List[dict]], sweep_runs: Dict[float, dict]) -> List[dict]:
    """One point per lambda of the sweep that has finished (seed 0)."""
    points = []
    for factor in args.lambda_sweep:
        run_ = sweep_runs.get(factor)
        if run_ is None:
            continue
        point = {"factor": factor, "lam": factor * args.lam, "source": run_["source"]}
        point.update({k: run_.get(k) for k in ("top1", "pg", "spg_mean", "ch", "nqh", "zero_maps")})
        points.append(point)
    return points


def machine_info(args) -> Dict[str, Any]:
    return {"workers": args.workers, "threads_per_worker": args.threads, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def write_outputs(out_dir: str, args, runs: Dict[str, List[dict]], status: str,
                  elapsed: float, figure: Optional[str] = None,
                  sweep_runs: Optional[Dict[float, dict]] = None) -> Dict[str, Any]:
    """Writes results.json, report.md and lambda_sweep.png from the finished runs (atomic
    rewrites)."""
    summaries = {}
    for v in args.variants:
        if runs.get(v):
            s = summarize_seeds(runs[v])
            s["name"] = VARIANTS[v][0]
            s["seeds"] = [r["seed"] for r in runs[v]]
            summaries[v] = s
    if "gc_finetune" in args.variants:
        _add_relative_cost(runs, summaries)
    config = {k: v for k, v in vars(args).items()}
    config["model"] = (f"SmallResNet(BasicBlock x [1,1,1,1], widths {args.width}..{8 * args.width}, "
                       f"stem 3x3 stride 1, layer4 {args.image_size // 8}x{args.image_size // 8})")
    claims = check_claims(summaries, pairs=PAIRS)
    comparison = transfer_comparison(summaries)
    audit = audit_comparison(summaries, layer=args.layer, pairs=PAIRS)
    points = _sweep_points(args, runs, sweep_runs or {})
    plot = None
    if len(points) >= 2:
        plot = lambda_sweep_plot(points, os.path.join(out_dir, "lambda_sweep.png"),
                                 title=f"{args.benchmark}: seed 0, {args.epochs} epochs")
    results = {"status": status, "benchmark": args.benchmark, "elapsed_s": round(elapsed, 1),
               "machine": machine_info(args), "config": config, "variants": summaries,
               "claims": claims, "transfer": comparison, "audit": audit, "lambda_sweep": points}
    _atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2) + "\n")

    cue = args.cue_prob > 0
    table = table1_markdown({s["name"]: s for s in summaries.values()}, model="ResNet", cue=cue)
    eps = ", ".join(f"{e:g}" for e in args.fgsm_eps)
    fgsm_rows = []
    for s in summaries.values():
        mean, sd = s.get("fgsm") or {}, (s.get("spread") or {}).get("fgsm") or {}
        fgsm_rows.append([f"ResNet {s['name']}", *(percent(mean.get(f"{e:g}"), sd.get(f"{e:g}") or 0)
                                                  for e in args.fgsm_eps)])
    fgsm_table = markdown_table(["Model", *(f"eps {e:g}" for e in args.fgsm_eps)], fgsm_rows)
    side = 2 * args.image_size // (8 if args.layer == "layer4" else 4)  # composite map side
    n_seeds = max((s["num_seeds"] for s in summaries.values()), default=0)
    times = ", ".join(f"{s['name']} {s['train_time_s']:.0f} s" for s in summaries.values()
                      if s.get("train_time_s") is not None)
    lines = [
        f"# Quickstart: Grad-CAM consistency on the `{args.benchmark}` benchmark",
        "",
        f"Status: **{status}** ({len(summaries)} of {len(args.variants)} variants, up to {n_seeds} "
        f"of {args.seeds} seeds, {len(points)} of {len(args.lambda_sweep)} lambda-sweep points), "
        f"{elapsed / 60:.1f} min on {os.cpu_count()} CPU core(s) ({args.workers} worker "
        f"process(es) of {args.threads} thread(s)); training time per run: {times or 'n/a'}.",
        "",
        "## Did the models learn the object?",
        "",
        f"Checked before any claim is read (threshold: {100 * LEARNED_TOP1:.0f}% test top-1):",
        "",
        *(learned_markdown(summaries) or ["- (no finished run yet)"]),
        "",
        "## Table 1 (test split)",
        "",
        f"Mean ± standard deviation over training seeds, in percent. SPG: mean over 5 runs of 100 "
        f"draws; *SPG run std* is the paper's within-run standard deviation. PG/SPG margin "
        f"{15 * args.image_size / 224:.2f} px (15 px at 224 px). NQH: lower is better; a uniform "
        f"map has NQH 75%. *Zero maps*: test images whose map is all zero after the ReLU (left "
        f"out of PG, SPG, CH and NQH, as in the paper's metrics; read CH and NQH together with "
        f"it)." + (" *Cue mass*: share of the element-wise Grad-CAM on the context-cue patch."
                   if cue else ""),
        "",
        table,
        f"FGSM top-1 (%), epsilon on the 0-255 scale ({eps}):",
        "",
        *fgsm_table.splitlines(),
        "",
        "## The paper's claims on these numbers",
        "",
        *(claims_markdown(claims, summaries) or ["- (not enough variants finished to compare)"]),
        "",
    ]
    if args.transfer != "none":
        n_transfer = min(args.transfer_images, args.test_size)
        lines += [
            "## Transfer to other explanation methods (the paper's Tables 3 and 4)",
            "",
            "The GC loss is computed with element-wise Grad-CAM only; these rows score the same "
            f"models under other methods (`--transfer {args.transfer}`), on the first "
            f"{n_transfer} test images and the same composites for every method. Means over "
            "seeds, in percent (spreads in results.json). Each method's maps are made "
            "non-negative by its library's rule (docs: Attribution methods); maps that come "
            "out all zero or NaN are skipped, not averaged in (their count is in results.json).",
            "",
            *transfer_markdown(summaries, comparison),
            "",
        ]
        paper = paper_transfer_markdown(summaries)
        if paper:
            lines += ["Against the paper's Tables 3 (cMWP) and 4 (FullGrad), metric by metric "
                      "(the paper's models are ResNet18s on MS-COCO; its NQH barely moves under "
                      "either method, its gains are in PG, SPG and CH):", "", *paper, ""]
    if args.audit_images > 0:
        n_audit = min(args.audit_images, args.test_size)
        lines += [
            "## Did the model change, or only its map?",
            "",
            "Measures that do not trust the Grad-CAM map (`captum_consistency.engine.audit_model`), "
            f"on 2x2 composites of the first {n_audit} test images (each in a random cell beside "
            "three images of other classes). *Ablation share*: each cell replaced in turn by "
            "zeros (the data set's mean colour; *blur*: the cell blurred), the share of the "
            "class logit's positive drops that the three distractor cells carry: NQH's twin read "
            "from the model's output (0: the distractors add no evidence; 0.75: the four cells "
            "alike). *Own cell removed*: the class probability, and the share of composites "
            "still given the class, from the distractors alone (chance: 25%). *Undefined*: "
            "composites whose logit no ablation lowers, left out of the share. Faithfulness on "
            f"the first {min(256, n_audit)} single test images: the mean of LeRF minus MoRF "
            "deletion curves of the class probability (10 steps, pixels set to zero), and ROAD "
            f"(pytorch-grad-cam, first {min(32, n_audit // 8)} images), each for Grad-CAM and for "
            "random maps of the same resolution (higher: the map marks what the model needs). "
            f"Randomisation (first {min(128, n_audit)} images): Adebayo et al.'s cascading "
            "re-initialisation from the top; a correlation near 1 means the map does not "
            "depend on those weights. Means ± standard deviation over seeds.",
            "",
            *audit_markdown(summaries, audit, layer=args.layer),
            "",
        ]
    if args.lambda_sweep:
        lines += ["## Lambda sweep (seed 0)", "",
                  "lambda = 0 is the baseline's seed-0 run and lambda = --lam the GC run's; "
                  "the others are GC runs trained for the sweep.", "",
                  *(sweep_markdown(points) if points else ["(no point finished yet)"]), ""]
        if plot:
            lines += [f"![NQH, CH and top-1 against lambda]({os.path.basename(plot)})", ""]
    if cue:
        # What the GC loss can act on here (a property of the loss and the data, not of a run).
        k, cs, sp = args.classes, args.cue_strength, args.stray_cue_prob
        p_train = args.cue_prob * (1 - cs) / (k - 1) + sp / k  # a distractor carries y's cue
        p_test = args.cue_prob / k + sp / k
        lines += [
            "## What GC can act on in this data",
            "",
            "Eq. 5 penalises map mass in the three distractor cells only, and the cue lies in "
            "the object's own cell (docs/results.md, \"What GC does not fix\"). Distractors "
            f"that carry the class's cue: about {100 * p_train:.0f}% in training "
            f"({100 * (1 - (1 - p_train) ** 3):.0f}% of composites), about {100 * p_test:.0f}% "
            f"in test ({100 * (1 - (1 - p_test) ** 3):.0f}% of composites).",
            "",
        ]
    if figure:
        if cue:
            caption = ("Rows: test images (cue-conflicting and cue-consistent, alternating; "
                       "caption: object / cue class); green box: object, red box: context cue.")
        else:
            caption = ("Rows: 2x2 composites of test images; the green box is the object whose "
                       "class is explained (caption: class, cell), the other three cells hold "
                       "shapes of other classes.")
        lines += ["## Figure 2", "",
                  f"![Element-wise Grad-CAM per variant]({os.path.basename(figure)})", "",
                  caption + f" Columns: the first seed's model of each variant, element-wise "
                  f"Grad-CAM of that class at {args.layer} (a tile labelled *all-zero map* is a "
                  "map that is zero everywhere after the ReLU).", ""]
    if "gc_finetune" in args.variants:
        lines += _cost_lines(args, summaries, out_dir)
    data = (f"`SpuriousContextShapes(num_classes={args.classes}, image_size={args.image_size}, "
            f"cue_prob={args.cue_prob:g}, cue_strength={args.cue_strength:g}, "
            f"stray_cue_prob={args.stray_cue_prob:g}, object_size={args.object_size}, "
            f"clutter={args.clutter:g})`")
    lines += [
        "## Set-up",
        "",
        f"- Data: {data}, {args.train_size} training images, {args.test_size} test images, "
        f"generator seed {args.data_seed} (shared by all runs; the seeds vary initialisation, "
        "batch order, cells and distractors).",
        f"- Model: {config['model']}; GMP: `to_global_max_pool`.",
        f"- Training: {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9 (Nesterov), "
        f"weight decay {args.weight_decay:g}, lr {args.lr:g} with 5% linear warm-up and cosine "
        f"decay per step; GC lambda {args.lam:g} (the paper's 25 on ImageNet's 14x14 composite "
        f"map is {25 * side * side / 196:.1f} for this {side}x{side} one: the consistency term "
        "is a mean over the map's locations), in-batch distractors"
        + (", target map detached" if args.detach_target else "") + ".",
        f"- Evaluation: `evaluate_interpretations(method='elementwise-gradcam')` at {args.layer}; "
        "`fgsm_accuracy`.",
        f"- Machine: {results['machine']['machine']}, {results['machine']['cpu_count']} CPU(s), "
        f"torch {results['machine']['torch']}, {results['machine']['date']}.",
        "",
    ]
    _atomic_write(os.path.join(out_dir, "report.md"), "\n".join(lines))
    return results


def make_figure(args, models: Dict[str, torch.nn.Module], test: SpuriousContextShapes,
                out_dir: str, device) -> Optional[str]:
    """gradcam.png: the same test inputs, element-wise Grad-CAM of every variant."""
    if not models:
        return None
    inputs = figure_inputs(test, args.figure_images)
    if inputs is None:  # too few test images of other classes for a composite
        return None
    images, labels = inputs.images.to(device), inputs.classes.to(device)
    maps = {}
    for v, model in models.items():
        explainer = SaliencyExplainer(model, "elementwise-gradcam", layer=getattr(model, args.layer))
        with torch.no_grad():
            maps[VARIANTS[v][0]] = explainer(images, torch.arange(len(labels), device=device), labels)
    side = inputs.rgb.shape[1]
    tile = 4 * side if inputs.cue_boxes is not None else 2 * side
    panel = gradcam_panel(inputs.rgb, maps, titles=inputs.titles, tile=tile,
                          object_boxes=inputs.boxes, cue_boxes=inputs.cue_boxes)
    path = os.path.join(out_dir, "gradcam.png")
    panel.save(path)
    return path


# ------------------------------------------------------------- fine-tuning and partial GC


def finetune_model(args, seed: int, train_images, train_labels, device,
                   lam: Optional[float] = None, epochs: Optional[int] = None) -> Dict[str, Any]:
    """``gc_finetune``: trains the seed's baseline (the same run as the ``baseline`` job), then
    fine-tunes it with GC for ``epochs`` (``--finetune-epochs``) at ``--finetune-lr``; the
    times and image counts are the sums of both trainings."""
    base = train_model(args, "baseline", seed, train_images, train_labels, device)
    tuned = train_model(args, "gc_finetune", seed, train_images, train_labels, device, lam=lam,
                        init_state=base["model"].state_dict(),
                        epochs=args.finetune_epochs if epochs is None else epochs,
                        lr=args.finetune_lr)
    return dict(tuned, train_time_s=base["train_time_s"] + tuned["train_time_s"],
                finetune_time_s=tuned["train_time_s"], images=base["images"] + tuned["images"],
                base=base)


#: The target of the fine-tuning and partial-GC study (issue 21), against the baseline.
COST_TARGET = {"nqh_ratio": 0.7, "top1_drop": 0.03, "cost": 1.3}


def with_relative_cost(runs: Sequence[dict], baseline_runs: Sequence[dict]) -> List[dict]:
    """Each run with ``rel_time`` and ``rel_images``: its total training cost (seconds, and
    images forwarded and backpropagated) over the same seed's baseline training."""
    base = {r["seed"]: r for r in baseline_runs}
    out = []
    for r in runs:
        b = base.get(r["seed"])
        r = dict(r)
        if b is not None and r.get("train_images") is not None:
            r["rel_time"] = r["train_time_s"] / b["train_time_s"]
            r["rel_images"] = r["train_images"] / b["train_images"]
        out.append(r)
    return out


def meets_target(s: Mapping[str, Any], base: Mapping[str, Any]) -> Optional[bool]:
    """Whether a setting's means meet :data:`COST_TARGET` against the baseline's means: NQH at
    least 30% lower, CH and PG not lower, top-1 within 3 points, total cost (seconds and
    images) at most 1.3x the baseline's training."""
    keys = ("nqh", "ch", "pg", "top1", "rel_time", "rel_images")
    if any(s.get(k) is None for k in keys) or any(base.get(k) is None for k in keys[:4]):
        return None
    return bool(s["nqh"] <= COST_TARGET["nqh_ratio"] * base["nqh"] and s["ch"] >= base["ch"]
                and s["pg"] >= base["pg"] and s["top1"] >= base["top1"] - COST_TARGET["top1_drop"]
                and max(s["rel_time"], s["rel_images"]) <= COST_TARGET["cost"])


def cost_markdown(settings: Mapping[str, Mapping[str, Any]], base_key: str = "baseline") -> List[str]:
    """The cost table: per setting NQH, CH, PG, top-1 (mean ± spread over seeds), training
    seconds, relative cost in seconds and in images, and whether it meets the target."""
    base = settings.get(base_key) or {}
    rows = []
    for s in settings.values():
        sd = s.get("spread") or {}
        ok = meets_target(s, base) if s is not base else None
        rows.append([
            s["name"], *(percent(s.get(k), sd.get(k) or 0) for k in ("nqh", "ch", "pg", "top1")),
            f"{s['train_time_s']:.0f}" if s.get("train_time_s") is not None else "n/a",
            *(f"{s[k]:.2f} ± {sd.get(k) or 0:.2f}" if s.get(k) is not None else "n/a"
              for k in ("rel_time", "rel_images")),
            "-" if ok is None else ("yes" if ok else "no"),
        ])
    return markdown_table(["Setting", "NQH", "CH", "PG", "top-1", "train s", "cost (s)",
                           "cost (images)", "target"], rows).splitlines()


def _add_relative_cost(runs: Dict[str, List[dict]], summaries: Dict[str, dict]) -> None:
    """A run with ``gc_finetune``: every variant's seeds get ``rel_time`` and ``rel_images``
    (:func:`with_relative_cost`), and its summary their means and spreads."""
    if not runs.get("baseline"):
        return
    for v, s in summaries.items():
        cost = summarize_seeds(with_relative_cost(runs[v], runs["baseline"]))
        s["per_seed"] = cost["per_seed"]
        for key in ("rel_time", "rel_images"):
            s[key] = cost.get(key)
            s.setdefault("spread", {})[key] = (cost.get("spread") or {}).get(key)


def cost_settings(args, summaries: Mapping[str, dict]) -> Dict[str, dict]:
    """The variants' summaries as rows of :func:`cost_markdown`: ``gc_finetune`` named with
    its fine-tuning setting."""
    return {v: dict(s, name=s["name"] + (f" ({args.finetune_epochs} ep, lr {args.finetune_lr:g}, "
                                         f"lambda {args.finetune_lam:g})"
                                         if v == "gc_finetune" else ""))
            for v, s in summaries.items()}


def _cost_lines(args, summaries: Dict[str, dict], out_dir: str) -> List[str]:
    """report.md's cost section of a run with ``gc_finetune`` (and training_cost.png)."""
    if "baseline" not in summaries:
        return []
    settings = cost_settings(args, summaries)
    lines = ["## Training cost", "",
             "Total training cost relative to the same seed's baseline training (the fine-tuned "
             "model's includes its baseline's), in seconds of this run and in images forwarded "
             "and backpropagated (a 2x2 composite counts four). Target: NQH at least 30% below "
             "the baseline's, CH and PG not lower, top-1 within 3 points, cost at most 1.3x.",
             "", *cost_markdown(settings), ""]
    if len(settings) >= 2:
        plot = cost_plot(settings, os.path.join(out_dir, "training_cost.png"),
                         title=f"{args.benchmark}: NQH against training cost",
                         nqh_ratio=COST_TARGET["nqh_ratio"], max_cost=COST_TARGET["cost"])
        lines += [f"![NQH against relative training cost]({os.path.basename(plot)})", ""]
    return lines


def _study_jobs(args) -> List[Tuple[str, int]]:
    kinds = ["baseline+finetune" if "finetune" in args.study_settings else "baseline",
             *(k for k in ("gc", "every", "fraction") if k in args.study_settings)]
    return [(kind, seed) for seed in range(args.seeds) for kind in kinds]


def _finetune_key(args, epochs: int, lr: float, lam: float) -> str:
    if lr == args.finetune_lr and lam == args.lam:
        return f"finetune_{epochs}"
    return f"finetune_{epochs}_lr{lr:g}_lam{lam:g}"


def run_study_job(job: Tuple[str, int]) -> Tuple[tuple, List[Tuple[str, dict]]]:
    """One job of :func:`run_study`: ``(setting, metrics)`` of the models it trained."""
    args, (train_images, train_labels), test = _WORKER["args"], _WORKER["train"], _WORKER["test"]
    kind, seed = job
    device = torch.device("cpu")
    trained: List[Tuple[str, Dict[str, Any]]] = []
    if kind in ("baseline", "baseline+finetune"):
        base = train_model(args, "baseline", seed, train_images, train_labels, device)
        trained.append(("baseline", base))
        combos = [(e, lr, lam) for e in args.study_epochs for lr in args.study_lrs
                  for lam in args.study_lams] if kind == "baseline+finetune" else []
        for e, lr, lam in combos:
            tuned = train_model(args, "gc_finetune", seed, train_images, train_labels, device,
                                init_state=base["model"].state_dict(), epochs=e, lr=lr, lam=lam)
            trained.append((_finetune_key(args, e, lr, lam), dict(
                tuned, train_time_s=base["train_time_s"] + tuned["train_time_s"],
                finetune_time_s=tuned["train_time_s"], images=base["images"] + tuned["images"])))
    elif kind == "gc":
        trained.append(("gc", train_model(args, "gc", seed, train_images, train_labels, device)))
    elif kind == "every":
        trained.append((f"every_{args.study_every}", train_model(
            args, "gc", seed, train_images, train_labels, device, gc_every=args.study_every)))
    else:
        trained.append((f"fraction_{args.study_fraction:g}", train_model(
            args, "gc", seed, train_images, train_labels, device,
            gc_fraction=args.study_fraction)))
    out = []
    for key, t in trained:
        model = t["model"]
        t_eval = time.perf_counter()
        metrics = evaluate_on_shapes(model, test, device, layer=getattr(model, args.layer),
                                     seed=seed, fgsm_epsilons=args.fgsm_eps, transfer="none",
                                     audit=False, progress=not args.no_progress)
        metrics.update(seed=seed, train_time_s=round(t["train_time_s"], 2),
                       train_images=t["images"], eval_time_s=round(time.perf_counter() - t_eval, 2),
                       train_last_epoch=t["history"][-1])
        if "finetune_time_s" in t:
            metrics["finetune_time_s"] = round(t["finetune_time_s"], 2)
        out.append((key, metrics))
    return job, out


def _study_names(args) -> Dict[str, str]:
    names = {"baseline": "Baseline", "gc": f"GC from scratch ({args.epochs} ep)"}
    for e in args.study_epochs:
        for lr in args.study_lrs:
            for lam in args.study_lams:
                names[_finetune_key(args, e, lr, lam)] = (
                    f"GC fine-tuning {e} ep (lr {lr:g}" + (f", lambda {lam:g})" if lam != args.lam else ")"))
    names[f"every_{args.study_every}"] = f"partial GC: GC every {args.study_every} steps"
    names[f"fraction_{args.study_fraction:g}"] = f"partial GC: {args.study_fraction:g} of each batch"
    return names


def write_study(args, runs: Dict[str, List[dict]], status: str, elapsed: float) -> Dict[str, Any]:
    """finetune-results.json, finetune_cost.png and report.md of :func:`run_study`."""
    names = _study_names(args)
    settings = {}
    for key, name in names.items():
        if runs.get(key) and runs.get("baseline"):
            s = summarize_seeds(with_relative_cost(runs[key], runs["baseline"]))
            s.update(name=name, seeds=[r["seed"] for r in runs[key]])
            settings[key] = s
    base = settings.get("baseline") or {}
    for key, s in settings.items():
        s["meets_target"] = meets_target(s, base) if key != "baseline" else None
    results = {"status": status, "benchmark": args.benchmark, "elapsed_s": round(elapsed, 1),
               "machine": machine_info(args), "config": dict(vars(args)), "target": COST_TARGET,
               "settings": settings}
    out = args.output_dir
    _atomic_write(os.path.join(out, "finetune-results.json"), json.dumps(results, indent=2) + "\n")
    lines = [f"# GC fine-tuning and partial GC on the `{args.benchmark}` benchmark", "",
             f"Status: **{status}**, {elapsed / 60:.1f} min on {os.cpu_count()} CPU core(s) "
             f"({args.workers} worker process(es)), {args.seeds} seed(s). Mean ± spread over "
             "seeds, in percent; cost: total training cost over the same seed's baseline "
             "training, in seconds and in images forwarded and backpropagated (a 2x2 "
             "composite counts four).", ""]
    if settings:
        lines += cost_markdown(settings)
    if len(settings) >= 2 and "baseline" in settings:
        plot = cost_plot(settings, os.path.join(out, "finetune_cost.png"),
                         title=f"{args.benchmark}: {args.seeds} seed(s)",
                         nqh_ratio=COST_TARGET["nqh_ratio"], max_cost=COST_TARGET["cost"])
        lines += ["", f"![NQH against relative training cost]({os.path.basename(plot)})"]
    _atomic_write(os.path.join(out, "report.md"), "\n".join(lines) + "\n")
    return results


def run_study(args: argparse.Namespace) -> Dict[str, Any]:
    """``--finetune-study``: baseline, GC from scratch, GC fine-tuning of each seed's baseline
    for every ``--study-epochs`` and partial GC from scratch (``--study-every``,
    ``--study-fraction``), ``--seeds`` seeds each, in ``--workers`` processes."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train_ds, _ = _data_sets(args)
    os.makedirs(args.output_dir, exist_ok=True)
    train_images, train_labels = _render(train_ds, not args.no_progress, "render train", args.workers)
    runs: Dict[str, List[dict]] = {}
    status = "running"
    results = _study_results(args, run_study_job, _study_jobs(args), train_images, train_labels)
    try:
        for _, out in results:
            for key, metrics in out:
                runs.setdefault(key, []).append(metrics)
                runs[key].sort(key=lambda r: r["seed"])
            write_study(args, runs, status, time.perf_counter() - t0)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        results.close()
        final = write_study(args, runs, status, time.perf_counter() - t0)
    return final


def _study_results(args, job_fn: Callable, jobs: Sequence, train_images: Tensor, train_labels: Tensor,
                   train_masks: Optional[Tensor] = None):
    """Yields ``job_fn``'s results of a study's ``jobs``, in this process (``--workers 1``) or
    from a pool of ``--workers`` processes (in the order they finish; closing the generator
    stops the workers)."""
    if args.workers == 1:
        _init_worker(args, train_images, train_labels, train_masks)
        yield from map(job_fn, jobs)
        return
    import multiprocessing

    worker_args = argparse.Namespace(**dict(vars(args), no_progress=True))
    pool = multiprocessing.get_context("spawn").Pool(
        min(args.workers, len(jobs)), initializer=_init_worker,
        initargs=(worker_args, train_images, train_labels, train_masks))
    try:
        yield from pool.imap_unordered(job_fn, jobs)
    finally:
        pool.terminate()
        pool.join()


# ------------------------------------------------------------ explanation-guided losses


def _loss_lambdas(args) -> Dict[str, Tuple[float, float]]:
    """Per loss of ``--losses``: its default lambda (GC: ``--lam``, the quickstart's; the others:
    their class's default) and ``--losses-factor`` times it."""
    import inspect

    out = {}
    for name in args.losses:
        lam = args.lam if name == "gc" else float(
            inspect.signature(EXPLANATION_LOSSES[name]).parameters["lam"].default)
        out[name] = (lam, args.losses_factor * lam)
    return out


def _loss_jobs(args) -> List[Tuple[str, float, int]]:
    """``(loss, lambda, seed)``; ``("baseline", 0, seed)`` first in every seed."""
    lambdas = _loss_lambdas(args)
    return [job for seed in range(args.seeds) for job in [("baseline", 0.0, seed), *(
        (name, lam, seed) for name in args.losses for lam in lambdas[name])]]


def _loss_key(loss: str, lam: float) -> str:
    return "baseline" if loss == "baseline" else f"{loss}@{lam:g}"


def run_loss_job(job: Tuple[str, float, int]) -> Tuple[tuple, Dict[str, Any]]:
    """One model of :func:`run_losses`: trained, then scored with Table 1's metrics and the audit
    (no transfer table). A training that diverges is recorded as such (``diverged``)."""
    args, (train_images, train_labels), test = _WORKER["args"], _WORKER["train"], _WORKER["test"]
    loss, lam, seed = job
    device = torch.device("cpu")
    try:
        if loss in ("baseline", "gc"):
            t = train_model(args, loss, seed, train_images, train_labels, device, lam=lam or None)
        else:
            t = train_model(args, "baseline", seed, train_images, train_labels, device, lam=lam,
                            loss=loss, train_masks=_WORKER["masks"])
    except FloatingPointError as e:  # a non-finite loss: the setting failed, the study goes on
        return job, {"seed": seed, "diverged": str(e).splitlines()[0]}
    model, t_eval = t["model"], time.perf_counter()
    metrics = evaluate_on_shapes(model, test, device, layer=getattr(model, args.layer), seed=seed,
                                 fgsm_epsilons=args.fgsm_eps[:1], transfer="none",
                                 audit=args.audit_images > 0, audit_images=args.audit_images,
                                 progress=not args.no_progress)
    metrics.update(seed=seed, train_time_s=round(t["train_time_s"], 2),
                   eval_time_s=round(time.perf_counter() - t_eval, 2),
                   train_last_epoch=t["history"][-1])
    return job, metrics


#: How the losses table names the losses of :data:`~captum_consistency.losses.EXPLANATION_LOSSES`.
LOSS_NAMES = {"gc": "GC", "cgc": "CGC", "energy": "Energy", "l1": "L1", "ppce": "PPCE",
              "rrr": "RRR", "rrr-gradcam": "RRR on Grad-CAM"}


def losses_markdown(settings: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """The losses table: per setting top-1, PG, CH, NQH, the audit's ablation shares (cells
    zeroed, blurred) and own-cell-removed, zero maps (mean ± spread over seeds, percent),
    training time over the same seed's baseline's, and the seeds that diverged."""
    rows = []
    for s in settings.values():
        sd, a = s.get("spread") or {}, s.get("audit") or {}
        asd = sd.get("audit") or {}
        rows.append([
            LOSS_NAMES.get(s["name"], s["name"]), "-" if s.get("lam") is None else f"{s['lam']:g}",
            *(percent(s.get(k), sd.get(k) or 0) for k in ("top1", "pg", "ch", "nqh")),
            *(percent(a.get(k), asd.get(k) or 0) for k in ("ablation_share", "ablation_share_blur",
                                                          "own_cell_predicted")),
            percent(s.get("zero_maps"), sd.get("zero_maps") or 0),
            f"{s['rel_time']:.2f}" if s.get("rel_time") is not None else "n/a",
            f"{s['diverged']}/{s['runs']}" if s.get("diverged") else "0",
        ])
    return markdown_table(["Loss", "lambda", "top-1", "PG", "CH", "NQH", "Ablation share",
                           "Ablation share, blur", "Own cell removed, still predicted",
                           "Zero maps", "cost (s)", "diverged"], rows).splitlines()


def write_losses(args, runs: Dict[str, List[dict]], status: str, elapsed: float) -> Dict[str, Any]:
    """losses-results.json and report.md of :func:`run_losses`."""
    lambdas = _loss_lambdas(args)
    keys = {"baseline": ("Baseline", None)}
    for name, (lam, other) in lambdas.items():
        keys[_loss_key(name, lam)] = (name, lam)
        keys[_loss_key(name, other)] = (name, other)
    base_time = {r["seed"]: r["train_time_s"] for r in runs.get("baseline", []) if "train_time_s" in r}
    settings = {}
    for key, (name, lam) in keys.items():
        finished = runs.get(key) or []
        if not finished:
            continue
        trained = [r for r in finished if "diverged" not in r]
        for r in trained:
            if r["seed"] in base_time:
                r["rel_time"] = r["train_time_s"] / base_time[r["seed"]]
        s = summarize_seeds(trained) if trained else {"spread": {}}
        s.update(name=name, lam=lam, seeds=[r["seed"] for r in finished], runs=len(finished),
                 diverged=len(finished) - len(trained),
                 diverged_messages=[r["diverged"] for r in finished if "diverged" in r])
        settings[key] = s
    results = {"status": status, "benchmark": args.benchmark, "elapsed_s": round(elapsed, 1),
               "machine": machine_info(args), "config": dict(vars(args)),
               "lambdas": {k: list(v) for k, v in lambdas.items()}, "settings": settings}
    out = args.output_dir
    _atomic_write(os.path.join(out, "losses-results.json"), json.dumps(results, indent=2) + "\n")
    lines = [f"# Explanation-guided losses on the `{args.benchmark}` benchmark", "",
             f"Status: **{status}**, {elapsed / 60:.1f} min on {os.cpu_count()} CPU core(s) "
             f"({args.workers} worker process(es)), {args.seeds} seed(s), {args.epochs} epochs "
             "each. Each loss at its default lambda (GC: the quickstart's `--lam`) and at "
             f"{args.losses_factor:g} times it. Mean ± spread over seeds, in percent; the audit "
             f"on composites of the first {min(args.audit_images, args.test_size)} test images "
             "(0: no audit); cost: training seconds over the same seed's baseline's, in this "
             "run; *diverged*: seeds whose training loss became non-finite (left out of the "
             "means).", ""]
    lines += losses_markdown(settings) if settings else ["(no model finished yet)"]
    _atomic_write(os.path.join(out, "report.md"), "\n".join(lines) + "\n")
    return results


def run_losses(args: argparse.Namespace) -> Dict[str, Any]:
    """``--losses``: the baseline and every loss of ``--losses`` at two lambdas
    (:func:`_loss_lambdas`), ``--seeds`` seeds each, on the same data, in ``--workers``
    processes; rewritten after every model."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train_ds, _ = _data_sets(args)
    os.makedirs(args.output_dir, exist_ok=True)
    progress = not args.no_progress
    train_images, train_labels = _render(train_ds, progress, "render train", args.workers)
    masks = None
    if set(args.losses) & set(MASK_LOSSES):
        loader = DataLoader(train_ds.with_annotations(), batch_size=256,
                            num_workers=args.workers if args.workers > 1 else 0)
        masks = torch.cat([b.mask for b in loader])
    runs: Dict[str, List[dict]] = {}
    status = "running"
    jobs = _loss_jobs(args)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="models", disable=not progress, dynamic_ncols=True)
    results = _study_results(args, run_loss_job, jobs, train_images, train_labels, masks)
    try:
        for (loss, lam, _), metrics in results:
            bar.update()
            runs.setdefault(_loss_key(loss, lam), []).append(metrics)
            runs[_loss_key(loss, lam)].sort(key=lambda r: r["seed"])
            write_losses(args, runs, status, time.perf_counter() - t0)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        results.close()
        bar.close()
        final = write_losses(args, runs, status, time.perf_counter() - t0)
    return final


# -------------------------------------------------------------------------------------- main


def _jobs(args) -> List[Tuple[str, int, float, Optional[float]]]:
    """``(variant, seed, lam, sweep factor)`` of every model to train: the variants' seeds,
    then the lambda-sweep points that no variant's seed-0 run already gives."""
    jobs = [(v, seed, args.lam, None) for seed in range(args.seeds) for v in args.variants]
    for factor in args.lambda_sweep:
        if factor == 0 and "baseline" in args.variants:
            continue
        if factor == 1 and "gc" in args.variants:
            continue
        jobs.append(("baseline" if factor == 0 else "gc", 0, factor * args.lam, factor))
    return jobs


def _data_sets(args) -> Tuple[SpuriousContextShapes, SpuriousContextShapes]:
    data = dict(num_classes=args.classes, image_size=args.image_size, clutter=args.clutter,
                seed=args.data_seed, cue_prob=args.cue_prob, stray_cue_prob=args.stray_cue_prob,
                object_size=args.object_size)
    train = SpuriousContextShapes("train", cue_strength=args.cue_strength,
                                  length=args.train_size, **data)
    test = SpuriousContextShapes("test", length=args.test_size, cache=True, **data)
    return train, test


#: What a worker process keeps between its jobs: the rendered training set and the test set.
_WORKER: Dict[str, Any] = {}


def _init_worker(args, train_images: Tensor, train_labels: Tensor,
                 train_masks: Optional[Tensor] = None) -> None:
    torch.set_num_threads(args.threads)
    _WORKER.update(args=args, train=(train_images, train_labels), masks=train_masks,
                   test=_data_sets(args)[1])


def run_job(job: Tuple[str, int, float, Optional[float]], base: Optional[Dict[str, Any]] = None,
            ) -> Tuple[tuple, Dict[str, Any], Dict[str, Tensor]]:
    """Trains and evaluates one ``(variant, seed, lam, sweep factor)`` job with the data of
    :func:`_init_worker`; returns the job, its metrics and the model's ``state_dict``.

    ``gc_finetune`` fine-tunes ``base`` (the same seed's finished baseline job: its
    ``state``, ``train_time_s`` and ``train_images``), or, without it, trains that baseline
    first; either way its cost counts the baseline's training. It is scored without the
    transfer table, which compares the paper's variants."""
    args, (train_images, train_labels), test = _WORKER["args"], _WORKER["train"], _WORKER["test"]
    v, seed, lam, factor = job
    device = torch.device("cpu")
    if v == "gc_finetune" and base is not None:
        tuned = train_model(args, v, seed, train_images, train_labels, device, lam=args.finetune_lam,
                            init_state=base["state"], epochs=args.finetune_epochs, lr=args.finetune_lr)
        trained = dict(tuned, train_time_s=base["train_time_s"] + tuned["train_time_s"],
                       finetune_time_s=tuned["train_time_s"],
                       images=base["train_images"] + tuned["images"])
    elif v == "gc_finetune":
        trained = finetune_model(args, seed, train_images, train_labels, device,
                                 lam=args.finetune_lam)
    else:
        trained = train_model(args, v, seed, train_images, train_labels, device, lam=lam)
    t_eval = time.perf_counter()
    # lambda-sweep models get Table 1's metrics only; the transfer table is per paper variant
    model = trained["model"]
    metrics = evaluate_on_shapes(
        model, test, device, layer=getattr(model, args.layer), seed=seed,
        fgsm_epsilons=args.fgsm_eps,
        transfer=args.transfer if factor is None and v != "gc_finetune" else "none",
        transfer_images=args.transfer_images,
        audit=args.audit_images > 0 and factor is None, audit_images=args.audit_images,
        progress=not args.no_progress)
    metrics.update(seed=seed, train_time_s=round(trained["train_time_s"], 2),
                   eval_time_s=round(time.perf_counter() - t_eval, 2),
                   train_last_epoch=trained["history"][-1])
    if "gc_finetune" in args.variants:  # the cost column
        metrics.update(train_images=trained["images"])
        if "finetune_time_s" in trained:
            metrics.update(finetune_time_s=round(trained["finetune_time_s"], 2))
    return job, metrics, trained["model"].state_dict()


def _follow_up(args, job: tuple, metrics: Dict[str, Any], state: Dict[str, Tensor]):
    """The job that a finished job starts: a baseline seed's ``gc_finetune``, given its model."""
    v, seed, _, factor = job
    if v == "baseline" and factor is None and "gc_finetune" in args.variants:
        return ("gc_finetune", seed, args.lam, None), {
            "state": state, "train_time_s": metrics["train_time_s"],
            "train_images": metrics["train_images"]}
    return None


def _results(args, train_images: Tensor, train_labels: Tensor):
    """Yields ``run_job``'s results, in this process (``--workers 1``) or from a pool of
    ``--workers`` processes (in the order they finish). With ``baseline`` in the variants, a
    seed's ``gc_finetune`` job is queued when its baseline has finished and fine-tunes that
    model (the baseline is trained once, not twice)."""
    chained = {"baseline", "gc_finetune"} <= set(args.variants)
    jobs = [(job, None) for job in _jobs(args) if not (chained and job[0] == "gc_finetune")]
    if args.workers == 1:
        _init_worker(args, train_images, train_labels)
        while jobs:
            job, metrics, state = result = run_job(*jobs.pop(0))
            yield result
            follow = _follow_up(args, job, metrics, state)
            if follow is not None:
                jobs.append(follow)
        return
    import multiprocessing
    import queue

    # spawn, not fork: the parent has used torch's thread pool, which a forked child inherits
    # in an undefined state. Workers show no progress bars of their own (the parent's counts runs).
    worker_args = argparse.Namespace(**dict(vars(args), no_progress=True))
    pool = multiprocessing.get_context("spawn").Pool(
        min(args.workers, len(jobs)), initializer=_init_worker,
        initargs=(worker_args, train_images, train_labels))
    finished: "queue.SimpleQueue" = queue.SimpleQueue()
    for job in jobs:
        pool.apply_async(run_job, job, callback=finished.put, error_callback=finished.put)
    pending = len(jobs)
    try:
        while pending:
            try:
                result = finished.get(timeout=0.5)  # a timeout: Ctrl-C is seen while waiting
            except queue.Empty:
                continue
            pending -= 1
            if isinstance(result, BaseException):
                raise result
            yield result
            follow = _follow_up(args, *result)
            if follow is not None:
                pool.apply_async(run_job, follow, callback=finished.put, error_callback=finished.put)
                pending += 1
    except BaseException:  # an interrupt (or the consumer's close()) stops the models in training
        try:
            pool.terminate()
        except AssertionError:
            # multiprocessing asserts when the interrupt landed inside its result handler
            # ("Cannot have cache with result_hander not alive"); the workers are stopped
            # either way, and the interrupt, not this, is what the run ends with
            pass
        raise
    else:
        pool.close()
    finally:
        pool.join()


def run(args: argparse.Namespace, on_run_done: Optional[Callable[[str, int], None]] = None) -> Dict[str, Any]:
    """Trains and evaluates every (variant, seed) and the lambda sweep; raises
    KeyboardInterrupt after writing what was finished. ``on_run_done(variant, seed)`` is called
    after each finished run (``variant`` is ``"sweep:<factor>"`` for a sweep-only run)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    progress = not args.no_progress
    t0 = time.perf_counter()
    # Data sets first: their constructors validate every knob before anything is trained.
    train_ds, test = _data_sets(args)
    os.makedirs(args.output_dir, exist_ok=True)
    runs: Dict[str, List[dict]] = {v: [] for v in args.variants}
    sweep_runs: Dict[float, dict] = {}
    figure_models: Dict[str, torch.nn.Module] = {}
    status = "running"
    write_outputs(args.output_dir, args, runs, status, 0.0, sweep_runs=sweep_runs)
    finished = None
    try:
        train_images, train_labels = _render(train_ds, progress, "render train", args.workers)
        bar = tqdm(total=len(_jobs(args)), desc="runs", disable=not progress, dynamic_ncols=True)
        finished = _results(args, train_images, train_labels)
        for (v, seed, lam, factor), metrics, state in finished:
            bar.update()
            bar.set_postfix_str(f"{VARIANTS[v][0] if factor is None else f'lambda {lam:g}'}, seed {seed}")
            if factor is None:
                runs[v].append(metrics)
                runs[v].sort(key=lambda r: r["seed"])
                if seed == 0:
                    model = build_model(args.classes, args.width, VARIANTS[v][1])
                    model.load_state_dict(state)
                    figure_models[v] = model.eval()
                    for f in args.lambda_sweep:
                        if (f == 0 and v == "baseline") or (f == 1 and v == "gc"):
                            sweep_runs[f] = dict(metrics, source=f"{VARIANTS[v][0]}, seed 0")
            else:
                sweep_runs[factor] = dict(metrics, source="GC, lambda sweep")
            write_outputs(args.output_dir, args, runs, status, time.perf_counter() - t0,
                          sweep_runs=sweep_runs)
            if on_run_done is not None:
                on_run_done(v if factor is None else f"sweep:{factor:g}", seed)
        bar.close()
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if finished is not None:
            finished.close()  # stops the workers now, not when the traceback is freed
        # the figure's columns in the order of --variants, whatever order the runs finished in
        figure_models = {v: figure_models[v] for v in args.variants if v in figure_models}
        figure = make_figure(args, figure_models, test, args.output_dir, device)
        results = write_outputs(args.output_dir, args, runs, status, time.perf_counter() - t0,
                                figure, sweep_runs=sweep_runs)
    return results


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None,
         on_run_done: Optional[Callable[[str, int], None]] = None) -> int:
    import signal

    args = parse_args(argv)
    # SIGTERM (kill, a job scheduler) stops the run like Ctrl-C: the finished runs are written
    # and the worker processes are terminated instead of being left to finish their model.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.finetune_study or args.losses:
            results = (run_study if args.finetune_study else run_losses)(args)
            print(open(os.path.join(args.output_dir, "report.md")).read())
            return 0
        results = run(args, on_run_done)
    except KeyboardInterrupt:
        path = os.path.join(args.output_dir, "results.json")
        print(f"\ninterrupted: the finished runs are in {path} (and report.md); rerun to "
              "complete them", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(open(os.path.join(args.output_dir, "report.md")).read())
    print(f"results: {os.path.join(args.output_dir, 'results.json')} "
          f"({results['elapsed_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
