"""Evaluate a trained model: accuracy and the paper's interpretation metrics (Tables 1-4).

Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021::

    python recipes/evaluate.py --checkpoint runs/r18_gc/checkpoint.pth --data imagenet \\
        --data-root /data/imagenet --boxes /data/imagenet/boxes/val \\
        --method elementwise-gradcam --output-dir runs/r18_gc/eval
    # many GPUs: torchrun --nproc_per_node 4 recipes/evaluate.py ...
    # COCO (masks from the annotation file), transfer to another explanation method:
    python recipes/evaluate.py --checkpoint runs/coco/checkpoint.pth --data coco \\
        --data-root /data/coco --method fullgrad --output-dir runs/coco/eval_fullgrad
    # the audit (model-level ablations, faithfulness, randomisation) beside the metrics:
    python recipes/evaluate.py --checkpoint runs/r18_gc/checkpoint.pth --audit ...

Writes ``<output-dir>/metrics.json`` with ``top1`` (or ``f1_per_class`` and ``f1_overall``),
``pg``, ``spg_mean``, ``spg_std``, ``ch``, ``nqh`` and ``skipped`` (fractions in [0, 1]; counts
for ``skipped``), with ``--audit`` also ``audit`` (:func:`captum_consistency.engine.audit_model`:
did the model change, or only its map?), and ``<output-dir>/table.md``, a Markdown row in the form of the paper's
Table 1 (ImageNet, synthetic) or Table 2 (COCO), in percent.

Protocol (:mod:`captum_consistency.engine.evaluation`): PG, SPG (100 draws, mean and std over 5
runs), CH on whole images (short side ``2S``, maps resized to the original size), batched by
identical original size so that every number is the batch-size-1 one; NQH on ``2S x 2S``
composites of ``S x S`` crops; accuracy on the crops. Data options default to those recorded
in the checkpoint (``--data``, ``--data-root``, ``--image-size``, synthetic settings).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader

from captum_consistency import fold_batch_norm
from captum_consistency.data import (
    DatasetDistractorSampler,
    DistractorFallback,
    SizeGroupedBatchSampler,
    gather_distractors,
)
from captum_consistency.engine import (
    ShardSampler,
    check_checkpoint_compatible,
    distributed_session,
    rank_seed,
)
from captum_consistency.engine.cli import (
    add_data_arguments,
    end_of_checks,
    load_evaluated_checkpoint,
    non_negative_float,
    non_negative_int,
    positive_int,
    recipe_parser,
    run_cli,
    writable_dir,
)
from captum_consistency.engine.datasets import build_dataset, model_name
from captum_consistency.engine.evaluation import (
    METHODS,
    distractor_classes_ok,
    evaluate_interpretations,
)
from captum_consistency.report import interpretation_table


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = recipe_parser(
        "Accuracy, PG, SPG, CH and NQH of a trained model (Pillai & Pirsiavash, "
        "AAAI 2021, Tables 1-4); torchrun-ready.",
        add_help,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth written by recipes/train.py")
    p.add_argument("--method", default="elementwise-gradcam", choices=METHODS,
                   help="explanation method (the paper's main tables: element-wise Grad-CAM)")
    p.add_argument("--image-size", default=None, type=positive_int,
                   help="S: whole images get short side 2S, composites 2S x 2S (default: the checkpoint's)")
    p.add_argument("--batch-size", "-b", default=32, type=positive_int, help="images per process")
    p.add_argument("--workers", "-j", default=8, type=non_negative_int)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the forward passes")
    p.add_argument("--no-fold-bn", action="store_true",
                   help="keep batch norm as separate layers (by default it is folded into the "
                        "preceding convolutions for the Grad-CAM methods: same maps, faster)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 convolutions on CUDA (faster; moves CH/SPG by about 1e-3, "
                   "so the default is strict float32)")
    p.add_argument("--seed", default=0, type=int, help="seed of cells, distractors and SPG draws")
    p.add_argument("--tolerance", default=None, type=non_negative_float,
                   help="PG/SPG margin in pixels (default 15, the paper's; synthetic: 15 S / 224, "
                   "since its images are S x S and not resized)")
    p.add_argument("--spg-samples", default=100, type=positive_int, help="SPG draws per map")
    p.add_argument("--spg-runs", default=5, type=positive_int, help="SPG runs (mean and std)")
    p.add_argument("--no-nqh", action="store_true", help="do not compute NQH")
    g = p.add_argument_group("audit: did the model change, or only its map?")
    g.add_argument("--audit", action="store_true",
                   help="also run captum_consistency.engine.audit_model: cell-ablation share and "
                        "own-cell removal on 2x2 composites, deletion curves (and ROAD) of the "
                        "element-wise Grad-CAM against random maps, cascading randomisation")
    g.add_argument("--audit-composites", default=5000, type=non_negative_int, metavar="N",
                   help="composites ablated per process (0: every crop)")
    g.add_argument("--audit-faithfulness-images", default=256, type=non_negative_int, metavar="N",
                   help="images per process for the deletion curves (0: none)")
    g.add_argument("--audit-road-images", default=0, type=non_negative_int, metavar="N",
                   help="images per process for ROAD (pytorch-grad-cam, CPU, slow; 0: none)")
    g.add_argument("--audit-randomization-images", default=128, type=non_negative_int, metavar="N",
                   help="images per process for the randomisation check (0: none)")
    p.add_argument("--output-dir", required=True, type=writable_dir,
                   help="metrics.json and table.md go here (checked before evaluating)")
    p.add_argument("--no-progress", action="store_true")
    add_data_arguments(p, "evaluate")
    return p


def _audit(args, model, crop, device, info, make_distractors) -> dict:
    """The audit of the model on this process's crops, combined over processes: every mean
    weighted by the number of items it is over."""
    from captum_consistency.builders import gradcam_layer
    from captum_consistency.engine import all_reduce_sum, audit_model

    loader = DataLoader(crop.dataset, batch_size=args.batch_size, num_workers=args.workers,
                        sampler=ShardSampler(len(crop.dataset), info.rank, info.world_size),
                        collate_fn=crop.collate_fn, pin_memory=device.type == "cuda")
    generator = torch.Generator().manual_seed(rank_seed(args.seed, info.rank, 12))
    out = audit_model(
        model, loader, device, layer=gradcam_layer(model), make_distractors=make_distractors,
        generator=generator, multilabel=crop.multilabel,
        max_composites=args.audit_composites or None,
        faithfulness_images=args.audit_faithfulness_images, road_images=args.audit_road_images,
        randomization_images=args.audit_randomization_images, seed=args.seed,
        progress=not args.no_progress)
    if info.world_size == 1:
        return out
    weights = {
        "ablation_share": out["num_composites"] - out["ablation_undefined"],
        "ablation_share_blur": out["num_composites"] - out["ablation_undefined"],
        "own_cell_probability": out["num_composites"], "own_cell_predicted": out["num_composites"],
        "intact_probability": out["num_composites"],
        "deletion_gradcam": out["num_faithfulness_images"],
        "deletion_random": out["num_faithfulness_images"],
        "road_gradcam": out["num_road_images"], "road_random": out["num_road_images"],
    }
    blocks = list(out["randomization"])
    weights.update({f"randomization:{b}": 1.0 for b in blocks})
    values = dict(out, **{f"randomization:{b}": out["randomization"][b] for b in blocks})
    t = torch.tensor([[(values[k] or 0.0) * w if values[k] is not None else 0.0,
                       w if values[k] is not None else 0.0] for k, w in weights.items()],
                     dtype=torch.float64, device=device)
    counts = torch.tensor([out[k] for k in ("num_composites", "ablation_undefined",
                                             "num_faithfulness_images", "num_road_images")],
                          dtype=torch.float64, device=device)
    all_reduce_sum(t)
    all_reduce_sum(counts)
    for (key, _), (total, weight) in zip(weights.items(), t.tolist()):
        values[key] = total / weight if weight > 0 else None
    out.update({k: values[k] for k in weights if not k.startswith("randomization:")})
    out["randomization"] = {b: values[f"randomization:{b}"] for b in blocks}
    for key, value in zip(("num_composites", "ablation_undefined", "num_faithfulness_images",
                           "num_road_images"), counts.tolist()):
        out[key] = int(value)
    return out


def main(args) -> dict:
    """Runs the evaluation; returns the metrics (on every rank)."""
    with distributed_session(args.device) as info:
        return _main(args, info)


def _main(args, info) -> dict:
    if args.audit and args.no_nqh:
        raise ValueError("--audit builds the NQH composites: it cannot be combined with --no-nqh")
    device = info.device
    t0 = time.time()
    if device.type == "cuda":
        # PyTorch lets cuDNN use TF32 by default: maps then move by ~1e-3 with the batch size
        # and algorithm. Strict float32 keeps every number the per-image one.
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    model, ckpt, (data, data_root, image_size, split, synthetic) = load_evaluated_checkpoint(
        args, device)
    if args.method in ("gradcam", "elementwise-gradcam") and not args.no_fold_bn:
        # The same function without a normalisation pass over every activation. Grad-CAM at a
        # block output is invariant to folding;
        # FullGrad's bias terms and excitation backprop's rules are not, so they keep it.
        fold_batch_norm(model)
    # Channels-last convolutions are faster on CUDA and, with oneDNN, on the CPU.
    channels_last = True
    model.to(memory_format=torch.channels_last)
    classes = ckpt.get("classes")
    common = dict(data_root=data_root, ann_file=args.ann_file, skip_corrupt=args.skip_corrupt,
                  synthetic=synthetic, allow_empty=args.allow_empty_classes)
    whole = build_dataset(data, split, "whole", image_size, boxes=args.boxes,
                          classes=classes if data == "imagenet" else None,
                          skip_missing_boxes=args.skip_missing_boxes, **common)
    crop = build_dataset(data, split, "crop", image_size,
                         classes=classes if data == "imagenet" else None, **common)
    check_checkpoint_compatible(ckpt, args.checkpoint, num_classes=whole.num_classes,
                                classes=whole.classes)

    pin = device.type == "cuda"
    if data == "synthetic":
        whole_loader = DataLoader(
            whole.dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin,
            sampler=ShardSampler(len(whole.dataset), info.rank, info.world_size),
        )
    else:
        sampler = SizeGroupedBatchSampler(
            whole.dataset.original_sizes(), args.batch_size, short_side=None,
            num_replicas=info.world_size, rank=info.rank,
        )
        whole_loader = DataLoader(whole.dataset, batch_sampler=sampler, num_workers=args.workers,
                                  collate_fn=whole.collate_fn, pin_memory=pin)
    crop_loader = DataLoader(
        crop.dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin,
        sampler=ShardSampler(len(crop.dataset), info.rank, info.world_size),
        collate_fn=crop.collate_fn,
    )

    generator = torch.Generator().manual_seed(rank_seed(args.seed, info.rank, 3))
    spg_generator = torch.Generator(device=device).manual_seed(rank_seed(args.seed, info.rank, 4))
    make_distractors = distractor_ok = None
    if not args.no_nqh:
        # A class contained in all but fewer than 3 images has no valid composite (tiny sets).
        distractor_ok = distractor_classes_ok(crop.targets, crop.num_classes)
        fallback = DistractorFallback(
            crop.dataset, DatasetDistractorSampler(crop.targets, seed=rank_seed(args.seed, 0, 5),
                                                   rank=info.rank, num_classes=crop.num_classes)
        )

        def make_distractors(images, targets, gc_targets):
            return gather_distractors(images, targets, gc_targets, generator=generator, fallback=fallback)

    tolerance = args.tolerance
    if tolerance is None:
        tolerance = 15.0 * image_size / 224 if data == "synthetic" else 15.0
    end_of_checks()  # from here on errors are failures of the evaluation, not usage errors
    metrics = evaluate_interpretations(
        model, args.method, whole_loader, crop_loader, device, num_classes=whole.num_classes,
        multilabel=whole.multilabel, make_distractors=make_distractors, generator=generator,
        spg_generator=spg_generator, tolerance=tolerance, num_samples=args.spg_samples,
        num_runs=args.spg_runs, amp=args.amp, channels_last=channels_last,
        progress=not args.no_progress, distractor_ok=distractor_ok,
    )
    if args.audit:
        metrics["audit"] = _audit(args, model, crop, device, info, make_distractors)
    # Images that never reached the metrics because the data set dropped them at construction.
    dataset_skipped = int(getattr(whole.dataset, "num_skipped", 0))
    metrics["skipped"] += dataset_skipped
    metrics["skipped_detail"]["images_dropped_by_dataset"] = dataset_skipped
    name = model_name(ckpt)
    metrics.update({
        "model": name, "method": args.method, "checkpoint": os.path.abspath(args.checkpoint),
        "epoch": ckpt.get("epoch"), "data": data, "split": split, "image_size": image_size,
        "tolerance": tolerance, "world_size": info.world_size,
        "time_s": round(time.time() - t0, 3),
    })
    if info.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, allow_nan=False)
        table = interpretation_table(f"{name} ({args.method})", metrics, whole.multilabel)
        with open(os.path.join(args.output_dir, "table.md"), "w") as f:
            f.write(table)
        print(table, end="", flush=True)
        shown = {k: v for k, v in metrics.items() if k not in ("pg_per_class",)}
        print(json.dumps(shown), flush=True)
    return metrics


def cli(argv=None) -> dict:
    """The command line: every check before evaluating ends as a usage error (status 2)."""
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    cli()
