"""CPU quickstart: what the Grad-CAM consistency (GC) loss does, in minutes, with no download.

Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021::

    python recipes/quickstart.py --output-dir runs/quickstart          # make quickstart
    python recipes/quickstart.py --output-dir runs/qs_fast --fast      # under a minute

Trains the paper's four variants, Baseline, GC, GMP and GMP + GC, as small ResNets
(:class:`captum_consistency.quickstart.SmallResNet`: torchvision ``ResNet`` with
``BasicBlock`` x [1, 1, 1, 1], a CIFAR-style stride-1 stem and widths 16..128, so ``layer4``
is 4x4 at 32 px) on :class:`~captum_consistency.data.SpuriousContextShapes`, a procedural data
set whose training images put a class-correlated context cue next to the object (the cue of the
object's class with probability ``--cue-strength``) and whose test images draw the cue
independently of the class. Every variant is trained with ``--seeds`` seeds, evaluated with
:func:`captum_consistency.engine.evaluation.evaluate_interpretations` (element-wise Grad-CAM at
``layer4``: PG, SPG mean and std over 5 runs, CH against the exact object masks, NQH on 2x2
composites, top-1), top-1 on cue-consistent and cue-conflicting test images, the Grad-CAM mass
on the cue, and FGSM accuracy (:func:`captum_consistency.robust.fgsm_accuracy`).

Writes to ``--output-dir``:

* ``results.json``: ``variants`` -> one entry per variant (``baseline``, ``gc``, ``gmp``,
  ``gmp_gc``) with the means over seeds of ``top1``, ``top1_consistent``,
  ``top1_conflicting``, ``cue_gap``, ``follows_cue``, ``pg``, ``spg_mean``, ``spg_std``,
  ``ch``, ``nqh``, ``cue_mass``, ``fgsm`` (epsilon -> accuracy), ``spread`` (their standard
  deviation over seeds), ``per_seed`` and ``num_seeds``; plus ``config`` and ``status``.
  Rewritten after every trained model, so an interrupted run keeps what it finished.
* ``report.md``: a table in the form of the paper's Table 1 (mean ± spread over seeds), the
  paper's claims checked on these numbers, and the set-up.
* ``gradcam.png``: Figure-2-style panel, the same test images (cue-conflicting and
  cue-consistent) and their element-wise Grad-CAM overlays for each variant (first seed).

Training: SGD (momentum 0.9, Nesterov, weight decay 5e-4), batch 64, learning rate 0.05 with a
linear warm-up over the first 5% of the steps then a cosine decay to 0, stepped per batch;
``lambda = 8``: the consistency term is the *mean* over the composite map's locations of the L1
difference of two sum-1 maps, so its weight relative to the cross-entropy scales as
``lambda / (2h x 2w)``; the paper's 25 on ImageNet's 14x14 composite map is
``25 * 64 / 196 ~= 8`` on the 8x8 map of 32-px images. Distractors are taken from the batch
(:func:`captum_consistency.data.gather_distractors`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from captum_consistency import GradCamConsistencyLoss, to_global_max_pool
from captum_consistency.data import (
    SHAPES,
    DatasetDistractorSampler,
    DistractorFallback,
    SpuriousContextShapes,
    gather_distractors,
)
from captum_consistency.data.synthetic import MIN_IMAGE_SIZE
from captum_consistency.engine import rank_seed, train_one_epoch
from captum_consistency.engine.evaluation import SaliencyExplainer, evaluate_interpretations
from captum_consistency.metrics import content_heatmap
from captum_consistency.quickstart import SmallResNet, gradcam_panel, summarize_seeds, table1_markdown
from captum_consistency.robust import fgsm_accuracy

#: slug -> (display name, global max pooling, GC loss)
VARIANTS: Dict[str, tuple] = {
    "baseline": ("Baseline", False, False),
    "gc": ("GC", False, True),
    "gmp": ("GMP", True, False),
    "gmp_gc": ("GMP + GC", True, True),
}

#: What ``--fast`` caps (a smoke run of every code path, not a meaningful experiment).
FAST = {
    "seeds": 1, "train_size": 96, "epochs": 1, "batch_size": 32, "test_size": 48,
    "figure_images": 2, "width": 8,
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def _epsilons(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"epsilons must be non-negative numbers, got {text!r}")
    return values


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train Baseline, GC, GMP and GMP + GC small ResNets on SpuriousContextShapes "
        "on the CPU and report the paper's metrics (Table 1) and Grad-CAM overlays (Figure 2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output-dir", default="runs/quickstart", help="where results go")
    p.add_argument("--fast", action="store_true",
                   help=f"tiny smoke run (under a minute): overrides {', '.join(FAST)}")
    p.add_argument("--seeds", type=_positive_int, default=3, help="training seeds per variant")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    g = p.add_argument_group("data")
    g.add_argument("--classes", type=int, default=4, help=f"object classes (2..{len(SHAPES)})")
    g.add_argument("--image-size", type=int, default=32,
                   help=f"image side; a multiple of {SmallResNet.stride} (the network's stride), "
                   f"at least {MIN_IMAGE_SIZE}")
    g.add_argument("--cue-strength", type=float, default=0.9,
                   help="training P(cue class = object class)")
    g.add_argument("--clutter", type=float, default=0.5, help="background clutter in [0, 1]")
    g.add_argument("--train-size", type=_positive_int, default=2500, help="training images")
    g.add_argument("--test-size", type=_positive_int, default=1000,
                   help="test images (cue independent of the class)")
    g.add_argument("--data-seed", type=int, default=0, help="generator seed (shared by all runs)")
    g = p.add_argument_group("training")
    g.add_argument("--width", type=_positive_int, default=16,
                   help="channels of layer1 (doubled at each stage)")
    g.add_argument("--epochs", type=_positive_int, default=4)
    g.add_argument("--batch-size", type=_positive_int, default=64)
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--lam", type=float, default=8.0, help="GC weight lambda (see the docstring)")
    g.add_argument("--detach-target", action="store_true",
                   help="stop the gradient through the single image's map in the GC loss "
                   "(the paper and the authors' code do not)")
    g.add_argument("--layer", default="layer4", choices=("layer3", "layer4"),
                   help="Grad-CAM layer of the GC loss and of the evaluation (the paper: layer4)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--fgsm-eps", type=_epsilons, default=[0.0, 1.0, 2.0, 4.0, 8.0],
                   help="FGSM epsilons on the 0-255 scale")
    g.add_argument("--figure-images", type=_positive_int, default=6, help="rows of gradcam.png")
    g.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and validates the options; bad values exit with an argparse error (status 2)
    before anything is trained."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
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
    if not 0.0 <= args.cue_strength <= 1.0:
        parser.error(f"--cue-strength must be in [0, 1], got {args.cue_strength}")
    if not 0.0 <= args.clutter <= 1.0:
        parser.error(f"--clutter must be in [0, 1], got {args.clutter}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not (args.lam >= 0 and math.isfinite(args.lam)):
        parser.error(f"--lam must be a non-negative number, got {args.lam}")
    if args.weight_decay < 0:
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.batch_size < 4:
        parser.error(f"--batch-size must be at least 4 (three distractors per image), got {args.batch_size}")
    if args.train_size < args.batch_size:
        parser.error(f"--train-size ({args.train_size}) must be at least --batch-size ({args.batch_size})")
    if args.data_seed < 0:
        parser.error(f"--data-seed must be >= 0, got {args.data_seed}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown:
        parser.error(f"--variants must be a subset of {', '.join(VARIANTS)}, got {args.variants!r}")
    args.variants = variants
    return args


# ------------------------------------------------------------------------------------ pieces


def _render(dataset: SpuriousContextShapes, progress: bool, desc: str):
    """Renders a split once into ``(images, labels)`` tensors (shared by all runs)."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=256)
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


def train_model(args, variant: str, seed: int, train_images, train_labels, device) -> Dict[str, Any]:
    """Trains one variant with one seed; returns the model and training statistics."""
    _, gmp, gc = VARIANTS[variant]
    torch.manual_seed(rank_seed(seed, 0, 1))
    model = build_model(args.classes, args.width, gmp).to(device)
    train_set = TensorDataset(train_images, train_labels)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(rank_seed(seed, 0, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    total = args.epochs * len(loader)
    warmup = max(1, round(0.05 * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # Per-step schedule: train_one_epoch steps the optimizer; the hook steps the scheduler.
    handle = optimizer.register_step_post_hook(lambda *_: scheduler.step())
    generator = torch.Generator().manual_seed(rank_seed(seed, 0, 3))
    loss_fn = make_distractors = None
    if gc:
        loss_fn = GradCamConsistencyLoss(model, getattr(model, args.layer), lam=args.lam,
                                         detach_target=args.detach_target)
        fallback = DistractorFallback(
            train_set, DatasetDistractorSampler(train_labels, seed=rank_seed(seed, 0, 4),
                                                num_classes=args.classes))

        def make_distractors(images, targets, gc_targets):
            return gather_distractors(images, targets, gc_targets, generator=generator,
                                      fallback=fallback)

    t0 = time.perf_counter()
    history = []
    try:
        for epoch in range(args.epochs):
            stats = train_one_epoch(
                model, optimizer, loader, device, epoch, criterion=torch.nn.CrossEntropyLoss(),
                loss_fn=loss_fn, make_distractors=make_distractors, generator=generator,
                log_every=10, progress=not args.no_progress,
            )
            history.append({k: stats[k] for k in ("loss", "classification", "consistency", "top1")
                            if k in stats})
    finally:
        handle.remove()
    return {"model": model.eval(), "train_time_s": time.perf_counter() - t0, "history": history}


@torch.no_grad()
def cue_statistics(model, loader, device, layer) -> Dict[str, float]:
    """Top-1 on cue-consistent / cue-conflicting test images, how often a conflicting image is
    classified as its cue's class, and the element-wise Grad-CAM mass on the cue."""
    explainer = SaliencyExplainer(model, "elementwise-gradcam", layer=layer)
    sums = torch.zeros(6, dtype=torch.float64)  # correct/count consistent, conflicting, cue-follow, cue mass sum/count
    cue_mass_sum, cue_mass_n = 0.0, 0
    for batch in loader:
        images = batch.image.to(device)
        labels = torch.as_tensor(batch.label).to(device)
        cues = torch.as_tensor(batch.cue_label).to(device)
        pred = model(images).argmax(1)
        consistent = labels == cues
        correct = pred == labels
        sums[0] += (correct & consistent).sum().item()
        sums[1] += consistent.sum().item()
        sums[2] += (correct & ~consistent).sum().item()
        sums[3] += (~consistent).sum().item()
        sums[4] += ((pred == cues) & ~consistent).sum().item()
        maps = explainer(images, torch.arange(images.shape[0], device=device), labels)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        mass = content_heatmap(maps.clamp_(min=0), batch.cue_mask.to(device))
        ok = ~torch.isnan(mass)
        cue_mass_sum += float(mass[ok].sum())
        cue_mass_n += int(ok.sum())
    div = lambda a, b: float(a / b) if b > 0 else None  # noqa: E731
    return {
        "top1_consistent": div(sums[0], sums[1]),
        "top1_conflicting": div(sums[2], sums[3]),
        "follows_cue": div(sums[4], sums[3]),
        "cue_mass": cue_mass_sum / cue_mass_n if cue_mass_n else None,
    }


def evaluate_model(args, model, seed: int, test: SpuriousContextShapes, device) -> Dict[str, Any]:
    progress = not args.no_progress
    crop_loader = DataLoader(test, batch_size=250)
    whole_loader = DataLoader(test.with_annotations(), batch_size=250)
    generator = torch.Generator().manual_seed(rank_seed(seed, 0, 5))
    fallback = DistractorFallback(
        test, DatasetDistractorSampler(test.targets, seed=rank_seed(seed, 0, 6),
                                       num_classes=args.classes))

    def make_distractors(images, targets, gc_targets):
        return gather_distractors(images, targets, gc_targets, generator=generator, fallback=fallback)

    m = evaluate_interpretations(
        model, "elementwise-gradcam", whole_loader, crop_loader, device,
        num_classes=args.classes, make_distractors=make_distractors, generator=generator,
        spg_generator=torch.Generator(device=device).manual_seed(rank_seed(seed, 0, 7)),
        tolerance=15.0 * args.image_size / 224, progress=progress,
        layer=getattr(model, args.layer),
    )
    out = {k: m[k] for k in ("top1", "pg", "spg_mean", "spg_std", "ch", "nqh", "skipped")}
    # All-zero maps (the ReLU'd element-wise Grad-CAM of the class is <= 0 everywhere) are left
    # out of PG/SPG/CH/NQH, as in the paper's metrics; how often they occur is reported here.
    zero_img = m["skipped_detail"]["degenerate_maps_or_masks"]  # synthetic masks are never empty
    zero_cmp = m["skipped_detail"]["degenerate_composites"]
    out["zero_maps"] = zero_img / max(1, zero_img + m["num_images"])
    out["zero_maps_composite"] = zero_cmp / max(1, zero_cmp + m["num_composites"])
    out.update(cue_statistics(model, whole_loader, device, getattr(model, args.layer)))
    if out["top1_consistent"] is not None and out["top1_conflicting"] is not None:
        out["cue_gap"] = out["top1_consistent"] - out["top1_conflicting"]
    fgsm = fgsm_accuracy(model, crop_loader, epsilons=args.fgsm_eps, mean=test.mean,
                         std=test.std, device=device, progress=progress)
    out["fgsm"] = {f"{eps:g}": acc for eps, acc in fgsm.items()}
    return out


# ----------------------------------------------------------------------------------- reports


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _claims(summaries: Dict[str, dict]) -> List[str]:
    """The paper's claims on this data, checked on the means over seeds."""
    lines = []
    pairs = [("gc", "baseline"), ("gmp_gc", "gmp")]
    for new, ref in pairs:
        if new not in summaries or ref not in summaries:
            continue
        a, b = summaries[new], summaries[ref]
        na, nb = VARIANTS[new][0], VARIANTS[ref][0]
        if None in (a.get("nqh"), b.get("nqh"), a.get("ch"), b.get("ch"), a.get("top1"), b.get("top1")):
            continue
        rel = (b["nqh"] - a["nqh"]) / b["nqh"] if b["nqh"] > 0 else float("nan")
        ok = lambda c: "**yes**" if c else "**no**"  # noqa: E731
        lines.append(f"- {na} vs {nb}: NQH {100 * b['nqh']:.1f} -> {100 * a['nqh']:.1f} "
                     f"({100 * rel:+.0f}% relative reduction; claim >= 30%: {ok(rel >= 0.30)}); "
                     f"CH {100 * b['ch']:.1f} -> {100 * a['ch']:.1f} (claim: raised: "
                     f"{ok(a['ch'] > b['ch'])}); top-1 {100 * b['top1']:.1f} -> "
                     f"{100 * a['top1']:.1f} (claim: within 3 points: "
                     f"{ok(abs(a['top1'] - b['top1']) <= 0.03)})")
        if a.get("cue_gap") is not None and b.get("cue_gap") is not None:
            lines.append(f"  - cue-consistent minus cue-conflicting top-1: {100 * b['cue_gap']:.1f} -> "
                         f"{100 * a['cue_gap']:.1f} points (claim: narrowed: "
                         f"{ok(abs(a['cue_gap']) < abs(b['cue_gap']))}); Grad-CAM mass on the cue "
                         f"{100 * b['cue_mass']:.1f}% -> {100 * a['cue_mass']:.1f}%; conflicting "
                         f"images classified as their cue's class {100 * b['follows_cue']:.1f}% -> "
                         f"{100 * a['follows_cue']:.1f}%")
    return lines


def write_outputs(out_dir: str, args, runs: Dict[str, List[dict]], status: str,
                  elapsed: float, figure: Optional[str] = None) -> Dict[str, Any]:
    """Writes results.json and report.md from the finished runs (atomic rewrites)."""
    summaries = {}
    for v in args.variants:
        if runs.get(v):
            s = summarize_seeds(runs[v])
            s["name"] = VARIANTS[v][0]
            s["seeds"] = [r["seed"] for r in runs[v]]
            summaries[v] = s
    config = {k: v for k, v in vars(args).items()}
    config["model"] = (f"SmallResNet(BasicBlock x [1,1,1,1], widths {args.width}..{8 * args.width}, "
                       f"stem 3x3 stride 1, layer4 {args.image_size // 8}x{args.image_size // 8})")
    results = {"status": status, "elapsed_s": round(elapsed, 1), "config": config,
               "variants": summaries}
    _atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2) + "\n")

    table = table1_markdown({s["name"]: s for s in summaries.values()}, model="ResNet")
    eps = ", ".join(f"{e:g}" for e in args.fgsm_eps)
    fgsm_rows = ["| Model | " + " | ".join(f"eps {e:g}" for e in args.fgsm_eps) + " |",
                 "|---|" + "---|" * len(args.fgsm_eps)]
    for s in summaries.values():
        cells = []
        for e in args.fgsm_eps:
            key = f"{e:g}"
            mean = (s.get("fgsm") or {}).get(key)
            sd = ((s.get("spread") or {}).get("fgsm") or {}).get(key)
            cells.append("n/a" if mean is None else f"{100 * mean:.1f} ± {100 * (sd or 0):.1f}")
        fgsm_rows.append(f"| ResNet {s['name']} | " + " | ".join(cells) + " |")
    claims = _claims(summaries)
    side = 2 * args.image_size // (8 if args.layer == "layer4" else 4)  # composite map side
    n_seeds = max((s["num_seeds"] for s in summaries.values()), default=0)
    lines = [
        "# Quickstart: Grad-CAM consistency on SpuriousContextShapes",
        "",
        f"Status: **{status}** ({len(summaries)} of {len(args.variants)} variants, up to {n_seeds} "
        f"of {args.seeds} seeds), {elapsed / 60:.1f} min with {torch.get_num_threads()} CPU thread(s).",
        "",
        "## Table 1 (test split: cue independent of the class)",
        "",
        f"Mean ± standard deviation over training seeds, in percent. SPG: mean over 5 runs of 100 "
        f"draws; *SPG run std* is the paper's within-run standard deviation. PG/SPG margin "
        f"{15 * args.image_size / 224:.2f} px (15 px at 224 px). NQH: lower is better. "
        f"*Cue mass*: share of the element-wise Grad-CAM on the context-cue patch. *Zero maps*: "
        f"test images whose map is all zero after the ReLU (left out of PG, SPG, CH and NQH, as "
        f"in the paper's metrics; read CH and NQH together with it).",
        "",
        table,
        f"FGSM top-1 (%), epsilon on the 0-255 scale ({eps}):",
        "",
        *fgsm_rows,
        "",
        "## The paper's claims on these numbers",
        "",
        *(claims or ["- (not enough variants finished to compare)"]),
        "",
    ]
    # What the GC loss can act on here (a property of the loss and the data, not of a run).
    k, cs, sp = args.classes, args.cue_strength, 0.25  # stray_cue_prob: the generator's default
    p_train = (1 - cs) / (k - 1) + sp / k  # a distractor (class != y) carries y's cue (approx.)
    p_test = 1 / k + sp / k
    lines += [
        "## What GC can act on in this data",
        "",
        "The GC loss compares the class's element-wise Grad-CAM on an image with its map on a 2x2 "
        "composite and penalises mass in the three distractor cells only. The context cue lies "
        "next to the object, inside the same cell: a model that reads the cue gives the same map "
        "on the image and in its cell, so the loss has no term against using the adjacent cue and "
        "no direct reason to narrow the cue-consistent / cue-conflicting gap. Its handle on the "
        "cue is a distractor that carries the class's cue (its own cue or a stray one): about "
        f"{100 * p_train:.0f}% of training distractors ({100 * (1 - (1 - p_train) ** 3):.0f}% of "
        f"training composites) against about {100 * p_test:.0f}% of test distractors "
        f"({100 * (1 - (1 - p_test) ** 3):.0f}% of test composites), where the cue is independent "
        "of the class; a cue-reliant model puts class evidence on those test distractors, which "
        "NQH counts. A uniform map has NQH 75% and CH equal to the object's share of the image.",
        "",
    ]
    if figure:
        lines += ["## Figure 2", "",
                  f"![Element-wise Grad-CAM per variant]({os.path.basename(figure)})", "",
                  "Rows: test images (cue-conflicting and cue-consistent, alternating; caption: "
                  "object / cue class); green box: object, red box: context cue. Columns: the "
                  "first seed's model of each variant, element-wise Grad-CAM of the object's "
                  f"class at {args.layer} (a uniformly blue tile, or one labelled *all-zero map*, is "
                  "a map that is zero everywhere after the ReLU).", ""]
    lines += [
        "## Set-up",
        "",
        f"- Data: `SpuriousContextShapes(num_classes={args.classes}, image_size={args.image_size}, "
        f"cue_strength={args.cue_strength}, clutter={args.clutter})`, {args.train_size} training "
        f"images, {args.test_size} test images, generator seed {args.data_seed} (shared by all "
        "runs; the seeds vary initialisation, batch order, cells and distractors).",
        f"- Model: {config['model']}; GMP: `to_global_max_pool`.",
        f"- Training: {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9 (Nesterov), "
        f"weight decay {args.weight_decay:g}, lr {args.lr:g} with 5% linear warm-up and cosine "
        f"decay per step; GC lambda {args.lam:g} (the paper's 25 on ImageNet's 14x14 composite "
        f"map is {25 * side * side / 196:.1f} for this {side}x{side} one: the consistency term "
        "is a mean over the map's locations), in-batch distractors.",
        f"- Evaluation: `evaluate_interpretations(method='elementwise-gradcam')` at {args.layer}; "
        "`fgsm_accuracy`.",
        "",
    ]
    _atomic_write(os.path.join(out_dir, "report.md"), "\n".join(lines))
    return results


def make_figure(args, models: Dict[str, torch.nn.Module], test: SpuriousContextShapes,
                out_dir: str, device) -> Optional[str]:
    """gradcam.png: the same test images, element-wise Grad-CAM of every variant."""
    if not models:
        return None
    conflicting = test.conflicting_indices().tolist()
    consistent = test.consistent_indices().tolist()
    picks: List[int] = []
    while len(picks) < min(args.figure_images, len(test)):
        source = conflicting if (len(picks) % 2 == 0 and conflicting) or not consistent else consistent
        picks.append(source.pop(0))
    samples = [test.sample(i) for i in picks]
    images = torch.stack([s.image for s in samples]).to(device)
    labels = torch.tensor([s.label for s in samples], device=device)
    maps = {}
    for v, model in models.items():
        explainer = SaliencyExplainer(model, "elementwise-gradcam", layer=getattr(model, args.layer))
        with torch.no_grad():
            maps[VARIANTS[v][0]] = explainer(images, torch.arange(len(picks), device=device), labels)
    rgb = torch.from_numpy(__import__("numpy").stack([test.rgb(i) for i in picks]))
    titles = [f"{test.classes[s.label]} / {test.classes[s.cue_label]}" for s in samples]
    panel = gradcam_panel(rgb.numpy(), maps, titles=titles, tile=4 * args.image_size,
                          object_boxes=torch.stack([s.box for s in samples]),
                          cue_boxes=torch.stack([s.cue_box for s in samples]))
    path = os.path.join(out_dir, "gradcam.png")
    panel.save(path)
    return path


# -------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, on_run_done: Optional[Callable[[str, int], None]] = None) -> Dict[str, Any]:
    """Trains and evaluates every (seed, variant); raises KeyboardInterrupt after writing what
    was finished. ``on_run_done(variant, seed)`` is called after each finished run."""
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    progress = not args.no_progress
    t0 = time.perf_counter()
    # Data sets first: their constructors validate every knob before anything is trained.
    train_ds = SpuriousContextShapes("train", num_classes=args.classes, image_size=args.image_size,
                                     cue_strength=args.cue_strength, clutter=args.clutter,
                                     length=args.train_size, seed=args.data_seed)
    test = SpuriousContextShapes("test", num_classes=args.classes, image_size=args.image_size,
                                 clutter=args.clutter, length=args.test_size, seed=args.data_seed,
                                 cache=True)
    os.makedirs(args.output_dir, exist_ok=True)
    runs: Dict[str, List[dict]] = {v: [] for v in args.variants}
    figure_models: Dict[str, torch.nn.Module] = {}
    status = "running"
    write_outputs(args.output_dir, args, runs, status, 0.0)
    try:
        train_images, train_labels = _render(train_ds, progress, "render train")
        jobs = [(seed, v) for seed in range(args.seeds) for v in args.variants]
        bar = tqdm(jobs, desc="runs", disable=not progress, dynamic_ncols=True)
        for seed, v in bar:
            bar.set_postfix_str(f"{VARIANTS[v][0]}, seed {seed}")
            trained = train_model(args, v, seed, train_images, train_labels, device)
            t_eval = time.perf_counter()
            metrics = evaluate_model(args, trained["model"], seed, test, device)
            metrics.update(seed=seed, train_time_s=round(trained["train_time_s"], 2),
                           eval_time_s=round(time.perf_counter() - t_eval, 2),
                           train_last_epoch=trained["history"][-1])
            runs[v].append(metrics)
            if seed == 0:
                figure_models[v] = trained["model"]
            write_outputs(args.output_dir, args, runs, status, time.perf_counter() - t0)
            if on_run_done is not None:
                on_run_done(v, seed)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        figure = make_figure(args, figure_models, test, args.output_dir, device)
        results = write_outputs(args.output_dir, args, runs, status, time.perf_counter() - t0,
                                figure)
    return results


def main(argv: Optional[Sequence[str]] = None,
         on_run_done: Optional[Callable[[str, int], None]] = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args, on_run_done)
    except KeyboardInterrupt:
        path = os.path.join(args.output_dir, "results.json")
        print(f"\ninterrupted: the finished runs are in {path} (and report.md); rerun to "
              "complete them", file=sys.stderr)
        return 130
    print(open(os.path.join(args.output_dir, "report.md")).read())
    print(f"results: {os.path.join(args.output_dir, 'results.json')} "
          f"({results['elapsed_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
