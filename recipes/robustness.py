"""Top-1 accuracy under FGSM attacks of growing strength: Table 6 of the paper.

Pillai & Pirsiavash, "Explainable Models with Consistent Interpretations", AAAI 2021, Table 6
(ResNet-50 baseline, GMP and GMP + GC against FGSM with ``L_inf`` epsilons 1 to 64 grey
levels)::

    python recipes/robustness.py --checkpoint runs/r50_gmp_gc/checkpoint.pth --data imagenet \\
        --data-root /data/imagenet --output-dir runs/r50_gmp_gc/fgsm
    # many GPUs: torchrun --nproc_per_node 4 recipes/robustness.py ...

The attack is :func:`captum_consistency.robust.fgsm_accuracy` (Captum's FGSM, epsilon on the
0-255 pixel scale, clamped to valid pixels) on the ``S x S`` validation crops of the data set's
standard protocol. Writes ``<output-dir>/robustness.json`` (accuracy per epsilon, fractions in
[0, 1], and the clean accuracy) and ``<output-dir>/robustness.md``, a Markdown row in the form
of Table 6 (percent). Single-label data only (ImageNet, synthetic).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader

from captum_consistency.engine import (
    ShardSampler,
    all_reduce_sum,
    check_checkpoint_compatible,
    distributed_session,
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
from captum_consistency.report import fgsm_table
from captum_consistency.robust import PAPER_EPSILONS, fgsm_accuracy


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = recipe_parser(
        "FGSM robustness table (Pillai & Pirsiavash, AAAI 2021, Table 6); torchrun-ready.",
        add_help,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth written by recipes/train.py")
    p.add_argument("--epsilons", default=list(PAPER_EPSILONS), type=non_negative_float, nargs="+",
                   help="L_inf strengths on the 0-255 scale (the paper's: 1 2 8 16 32 64)")
    p.add_argument("--image-size", default=None, type=positive_int, help="crop side S (default: the checkpoint's)")
    p.add_argument("--batch-size", "-b", default=64, type=positive_int, help="images per process")
    p.add_argument("--workers", "-j", default=8, type=non_negative_int)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--output-dir", required=True, type=writable_dir,
                   help="robustness.json and robustness.md go here (checked before the attack)")
    p.add_argument("--no-progress", action="store_true")
    add_data_arguments(p, "robustness")
    return p


def _eps_label(eps: float) -> str:
    return f"{eps:g}"


class _Counting:
    """Iterates a loader and counts the labels it yields (for the cross-rank average)."""

    def __init__(self, loader):
        self.loader, self.count, self.skipped = loader, 0, 0

    def __iter__(self):
        for batch in self.loader:
            self.skipped += int(getattr(batch, "skipped", 0))
            if batch[0].shape[0] == 0:
                continue
            self.count += int(batch[1].shape[0])
            yield batch[0], batch[1]


def main(args) -> dict:
    """Runs the attack; returns ``{"accuracy": {eps: top1}, "clean_top1": ...}`` on every rank."""
    with distributed_session(args.device) as info:
        return _main(args, info)


def _main(args, info) -> dict:
    device = info.device
    t0 = time.time()
    if any(e < 0 for e in args.epsilons):
        raise ValueError(f"--epsilons must be >= 0, got {args.epsilons}")
    model, ckpt, (data, data_root, image_size, split, synthetic) = load_evaluated_checkpoint(
        args, device)
    model.to(memory_format=torch.channels_last)  # as evaluate.py: faster, same clean accuracy
    if data == "coco" or ckpt.get("multilabel"):
        raise ValueError("robustness.py measures top-1 accuracy: use single-label data (imagenet, synthetic)")
    crop = build_dataset(data, split, "crop", image_size, data_root=data_root,
                         classes=ckpt.get("classes") if data == "imagenet" else None,
                         skip_corrupt=args.skip_corrupt, synthetic=synthetic,
                         allow_empty=args.allow_empty_classes)
    check_checkpoint_compatible(ckpt, args.checkpoint, num_classes=crop.num_classes, classes=crop.classes)
    loader = DataLoader(
        crop.dataset, batch_size=args.batch_size, num_workers=args.workers,
        sampler=ShardSampler(len(crop.dataset), info.rank, info.world_size),
        collate_fn=crop.collate_fn, pin_memory=device.type == "cuda",
    )
    counting = _Counting(loader)
    epsilons = [0.0] + [float(e) for e in args.epsilons if e != 0]
    end_of_checks()  # from here on errors are failures of the attack, not usage errors
    acc = fgsm_accuracy(model, counting, epsilons=epsilons, mean=crop.mean, std=crop.std,
                        device=device, progress=not args.no_progress and info.is_main)
    # Weighted average over ranks: each rank saw `count` images.
    sums = torch.tensor([acc[e] * counting.count for e in epsilons] + [counting.count, counting.skipped],
                        dtype=torch.float64, device=device)
    all_reduce_sum(sums)
    total = float(sums[-2])
    accuracy = {e: float(sums[i]) / total for i, e in enumerate(epsilons)}
    clean = accuracy.pop(0.0)
    name = model_name(ckpt)
    result = {
        "model": name,
        "clean_top1": clean,
        "accuracy": {_eps_label(e): v for e, v in accuracy.items()},
        "epsilon_scale": "0-255 pixel levels",
        "images": int(total),
        "skipped": int(sums[-1]) + int(getattr(crop.dataset, "num_skipped", 0)),
        "checkpoint": os.path.abspath(args.checkpoint),
        "data": data, "split": split, "image_size": image_size,
        "time_s": round(time.time() - t0, 3),
    }
    if info.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "robustness.json"), "w") as f:
            json.dump(result, f, indent=1)
        table = fgsm_table(name, clean, accuracy)
        with open(os.path.join(args.output_dir, "robustness.md"), "w") as f:
            f.write(table)
        print(table, end="", flush=True)
        print(json.dumps(result), flush=True)
    return result


def cli(argv=None) -> dict:
    """The command line: every check before the attack ends as a usage error (status 2)."""
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    cli()
