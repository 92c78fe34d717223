"""Training throughput on a GPU: a ResNet, baseline (cross-entropy) step vs GC steps (both modes).

One prepared script for a GPU machine (it also runs, slowly, on the CPU with ``--quick``).
ResNet-18 by default (``--arch resnet50`` and any torchvision ResNet with a ``layer4``).
Synthetic data (random tensors, 224 x 224, as ``recipes/train.py`` feeds them after decoding),
bf16 autocast (``--amp``, on by default on CUDA), channels-last, SGD with momentum, the whole
optimiser step timed:

* ``ce_224``: a baseline training step on the ``S x S`` images (``--gc-lambda 0``);
* ``ce_448``: a cross-entropy step on ``2S x 2S`` composites (what the GC forward adds);
* ``ce_pair_composed`` (breakdown): distractors, composites, both forwards, one backward and
  one optimiser step, i.e. a GC step without the Grad-CAM maps and their double backward;
  ``distractors_and_compose``: the distractor gather and the composition alone;
* ``gc``: a GC step with per-image composites
  (:class:`captum_consistency.GradCamConsistencyLoss`, lambda 25): in-batch distractors (three
  per image, labels excluding its class, batched ``topk`` on random keys as
  :func:`captum_consistency.data.in_batch_distractors`), the ``2S x 2S`` composites, forwards
  of both, the element-wise Grad-CAM maps with a double backward, and the SGD step;
* ``gc_shared``: a GC step with shared composites (``composites="shared"``): the batch grouped
  on the CPU labels (:func:`captum_consistency.data.shared_composite_groups`, as
  ``recipes/train.py --composites shared`` does), ``N / 4`` composites, a copy of the
  composite's ``layer4`` activations per image, the maps, the double backward and the SGD step.

Reported: images per second of the baseline, of per-image GC and of shared GC training; the
ratio of a per-image GC step to one cross-entropy step at 224 plus one at 448 (target at most
1.05: the only work GC adds beyond the composite's forward and backward is the double backward
through the head, at ``layer4``); the ratio of a shared GC step to one cross-entropy step at
224 (target at most 2.2: the composites hold the batch's pixels once more). Random labels of
1000 classes: every image of a batch of 128 is grouped (``ungrouped`` in the JSON). Prints a
table and one JSON object (with the GPU, torch version and date).

Dependencies: torch, torchvision and ``captum_consistency`` (whose import needs Captum, pure
Python). Run: ``python benchmarks/gpu_train_throughput.py [--batch-size 128] [--steps 20]``
(under 4 minutes on an H100 or H200), or ``--quick --device cpu``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
import torchvision

from captum_consistency import GradCamConsistencyLoss, compose_grid
from captum_consistency.data import shared_composite_groups


def _in_batch_distractors(images, labels, generator):
    # Three distinct batch mates whose label differs (what the data library does, batched).
    n = images.shape[0]
    keys = torch.rand(n, n, device=images.device, generator=generator)
    keys = keys.masked_fill(labels.view(1, -1) == labels.view(-1, 1), -1.0)
    return images[keys.topk(3, dim=1).indices]


def _timer(device: torch.device):
    if device.type == "cuda":
        def measure(fn: Callable[[], None], steps: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0 / steps
    else:
        def measure(fn: Callable[[], None], steps: int) -> float:
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            return (time.perf_counter() - t0) / steps
    return measure


def run(batch_size: int, size: int, steps: int, warmup: int, rounds: int, device: torch.device,
        amp: bool, num_classes: int = 1000, arch: str = "resnet18") -> Dict:
    torch.manual_seed(0)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    model = model.to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=25.0)
    shared_fn = GradCamConsistencyLoss(model, model.layer4, lam=25.0, composites="shared")
    g = torch.Generator(device=device).manual_seed(0)
    g_cpu = torch.Generator().manual_seed(0)  # cells come from the CPU, as in recipes/train.py
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch_size,), device=device, generator=g)
    y_cpu = y.cpu()  # the labels as the loader gives them, for the CPU grouping
    ungrouped: List[int] = []
    composite = compose_grid(x, _in_batch_distractors(x, y, g)).contiguous(memory_format=fmt)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else (
        lambda: torch.autocast(device.type, enabled=False))

    def ce_step(inp):
        def step():
            with ctx():
                loss = F.cross_entropy(model(inp), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def gc_step():
        with ctx():
            z = _in_batch_distractors(x, y, g)
            cells = torch.randint(0, 4, (batch_size,), generator=g_cpu)
            out = loss_fn(x, y, z, cells=cells)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def gc_shared_step():
        groups, cells = shared_composite_groups(y_cpu, generator=g_cpu)
        with ctx():
            out = shared_fn(x, y, cells=cells, groups=groups)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        ungrouped.append(out.num_ungrouped)

    def ce_pair_step():
        # Breakdown only: what GC does minus the Grad-CAM maps and the double backward
        # (distractors, composition, both forwards, one backward, one optimiser step).
        with ctx():
            z = _in_batch_distractors(x, y, g)
            cells = torch.randint(0, 4, (batch_size,), generator=g_cpu)
            comp = compose_grid(x, z, cells=cells)
            loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(comp), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def prep_only():
        with ctx():
            z = _in_batch_distractors(x, y, g)
            cells = torch.randint(0, 4, (batch_size,), generator=g_cpu)
            compose_grid(x, z, cells=cells)

    steps_fn = {"ce_224": ce_step(x), "ce_448": ce_step(composite), "gc": gc_step,
                "gc_shared": gc_shared_step, "ce_pair_composed": ce_pair_step,
                "distractors_and_compose": prep_only}
    measure = _timer(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    for fn in steps_fn.values():
        measure(fn, warmup)
    times: Dict[str, List[float]] = {k: [] for k in steps_fn}
    for _ in range(rounds):  # interleaved, so that clock or load drift hits all alike
        for name, fn in steps_fn.items():
            times[name].append(measure(fn, steps))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    ratio = med["gc"] / (med["ce_224"] + med["ce_448"])
    shared_ratio = med["gc_shared"] / med["ce_224"]
    return {
        "model": arch,
        "image_size": size,
        "composite_size": 2 * size,
        "batch_size": batch_size,
        "step_s": med,
        "images_per_s": {
            "baseline_ce_224": batch_size / med["ce_224"],
            "gc": batch_size / med["gc"],
            "gc_shared": batch_size / med["gc_shared"],
            "ce_448": batch_size / med["ce_448"],
        },
        "gc_over_ce224_plus_ce448": ratio,
        "gc_over_ce224": med["gc"] / med["ce_224"],
        "gc_shared_over_ce224": shared_ratio,
        "gc_over_gc_shared": med["gc"] / med["gc_shared"],
        "gc_shared_ungrouped_max": max(ungrouped),
        "breakdown_s": {
            "distractors_and_compose": med["distractors_and_compose"],
            "gc_maps_and_double_backward": med["gc"] - med["ce_pair_composed"],
            "one_step_for_both_vs_two_steps": med["ce_pair_composed"] - med["distractors_and_compose"]
            - med["ce_224"] - med["ce_448"],
        },
        "target": "gc_over_ce224_plus_ce448 <= 1.05, gc_shared_over_ce224 <= 2.2",
        "ok": ratio <= 1.05,
        "ok_shared": shared_ratio <= 2.2,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None,
    }


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--arch", default="resnet18", help="a torchvision ResNet (resnet18, resnet50, ...)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (quick: 4)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 10)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--amp", dest="amp", action="store_true", default=None, help="bf16 autocast")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--json", default="", help="also write the JSON to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    amp = (device.type == "cuda") if args.amp is None else args.amp
    batch = args.batch_size or (4 if args.quick else 128)
    size = args.image_size or (64 if args.quick else 224)
    steps = args.steps or (1 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    res = run(batch, size, steps, warmup=1 if args.quick else 3, rounds=rounds, device=device, amp=amp,
              arch=args.arch)
    info = {
        "benchmark": "gpu_train_throughput",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "amp_bf16": amp,
        "channels_last": device.type == "cuda",
        **res,
    }
    print(json.dumps(info, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    sp = res["step_s"]
    rows = [
        {"benchmark": f"GC step vs CE@{size} + CE@{2 * size}, batch {batch}, {'bf16' if amp else 'fp32'}",
         "ours_s": sp["gc"], "peer": f"CE@{size} + CE@{2 * size}", "peer_s": sp["ce_224"] + sp["ce_448"],
         "ratio": res["gc_over_ce224_plus_ce448"], "target": "<= 1.05", "ok": res["ok"]},
        {"benchmark": f"GC shared step vs CE@{size}, batch {batch}, {res['gc_shared_ungrouped_max']} ungrouped",
         "ours_s": sp["gc_shared"], "peer": f"CE@{size}", "peer_s": sp["ce_224"],
         "ratio": res["gc_shared_over_ce224"], "target": "<= 2.2", "ok": res["ok_shared"]},
        {"benchmark": f"GC per-image training vs baseline, img/s {res['images_per_s']['gc']:.0f} "
                      f"vs {res['images_per_s']['baseline_ce_224']:.0f}",
         "ours_s": sp["gc"], "peer": f"CE@{size} (baseline)", "peer_s": sp["ce_224"],
         "ratio": res["gc_over_ce224"], "target": "info", "ok": True},
        {"benchmark": f"GC per-image vs GC shared, img/s {res['images_per_s']['gc']:.0f} "
                      f"vs {res['images_per_s']['gc_shared']:.0f}",
         "ours_s": sp["gc"], "peer": "GC shared", "peer_s": sp["gc_shared"],
         "ratio": res["gc_over_gc_shared"], "target": "info", "ok": True},
    ]
    print(f"{'benchmark':64s} {'ours (s)':>10s} {'peer (s)':>10s} {'ratio':>7s} {'target':>8s} ok")
    for r in rows:
        print(f"{r['benchmark'][:64]:64s} {r['ours_s']:10.4f} {r['peer_s']:10.4f} {r['ratio']:7.3f} "
              f"{r['target']:>8s} {'yes' if r['ok'] else 'NO'}")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
