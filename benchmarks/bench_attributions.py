"""Seconds per image of every registry method, ResNet-18 at 224 px, batch 16 (for choosing one).

Each method of ``captum_consistency.attr.available_attributions()`` is called through
``get_attribution(name, model).attribute(images, targets)`` with its default options on a
randomly initialised torchvision ResNet-18 in eval mode, 16 images of 224 x 224. The peer of
every row is Captum's ``LayerGradCam`` called directly on the same batch in the same run: the
ratio says how many Grad-CAMs a method costs. Two more rows check that the adapters add nothing
to the libraries' own cost: ``pgc:gradcam`` against pytorch-grad-cam's ``GradCAM`` and
``captum:saliency`` against Captum's ``Saliency``, called directly (target: ratio <= 1.1).

Methods that cost under 5 s per batch are timed 3 times (median), the others once; every method
is first run on one image (warm-up). ``--clock cpu --threads 1`` measures CPU seconds of one
thread, which other jobs on a shared machine do not inflate. Default options: integrated gradients 50 steps, SmoothGrad
16 samples, occlusion 13 x 13 windows of 32 px, ScoreCAM and AblationCAM all 512 channels of
``layer4`` (their cost is one forward pass per channel). ``--quick``: 112 px, batch 8, and the
methods with hundreds of forward passes per image are left out.
Run: ``python benchmarks/bench_attributions.py [--quick] [--device cuda] [--only NAME,...]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, print_table, row  # noqa: E402

from captum_consistency.attr import available_attributions, get_attribution  # noqa: E402

#: Hundreds of forward passes per image: left out of --quick.
SLOW = ("captum:integrated-gradients", "captum:smoothgrad", "captum:occlusion", "pgc:scorecam",
        "pgc:ablationcam")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _seconds(fn: Callable[[], object], sync: Optional[Callable[[], None]], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = _clock()
        fn()
        if sync:
            sync()
        times.append(_clock() - start)
    return statistics.median(times)


def _timed(fn: Callable[[], object], sync: Optional[Callable[[], None]]) -> float:
    """One run; two more (median of three) when a run is under 5 s."""
    first = _seconds(fn, sync, 1)
    if first >= 5.0:
        return first
    return statistics.median([first, _seconds(fn, sync, 1), _seconds(fn, sync, 1)])


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="112 px, batch 8, no slow methods")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="", help="comma-separated registry names")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (with "
                        "--threads 1, the elapsed time of a quiet machine, unaffected by other "
                        "jobs on a shared one)")
    parser.add_argument("--threads", default=None, type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size, batch = (112, 8) if args.quick else (224, 16)
    names = [n for n in args.only.split(",") if n] or available_attributions()
    if args.quick:
        names = [n for n in names if n not in SLOW]
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)

    from captum.attr import LayerGradCam, Saliency

    gradcam = LayerGradCam(model, model.layer4)
    call_gradcam = lambda: gradcam.attribute(x, target, relu_attributions=True)  # noqa: E731
    call_gradcam()
    peer_s = _seconds(call_gradcam, sync, 5)
    rows: List[Dict] = []
    for name in names:
        method = get_attribution(name, model)
        method.attribute(x[:1], target[:1])  # warm-up (and the one-off checks of some methods)
        ours_s = _timed(lambda: method.attribute(x, target), sync)
        print(f"{name}: {ours_s / batch:.4f} s/image", file=sys.stderr, flush=True)
        rows.append(row(f"{name} resnet18 {size}px per image @b{batch}", ours_s / batch,
                        "captum LayerGradCam", peer_s / batch, "info", True))

    # the adapters against the libraries called directly
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(int(t)) for t in target]

    def direct_gradcam():
        cam = GradCAM(model, [model.layer4])
        try:
            return cam(x, targets)
        finally:
            cam.activations_and_grads.release()

    checks = (
        ("pgc:gradcam", direct_gradcam, "pytorch-grad-cam GradCAM"),
        ("captum:saliency", lambda: Saliency(model).attribute(x, target), "captum Saliency"),
    )
    for name, direct, peer in checks:
        method = get_attribution(name, model)
        call = lambda: method.attribute(x, target)  # noqa: E731
        call()
        direct()
        ours, theirs = [], []
        for _ in range(5):  # interleaved, so that drifting load affects both alike
            ours.append(_seconds(call, sync, 1))
            theirs.append(_seconds(direct, sync, 1))
        ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
        rows.append(row(f"{name} adapter vs direct call, per image @b{batch}", ours_s / batch, peer,
                        theirs_s / batch, "<= 1.1", ours_s <= 1.1 * theirs_s))
    return rows


if __name__ == "__main__":
    print(f"# bench_attributions on {machine()}")
    print_table(main())
