"""Cost of the transfer-evaluation attributions against their peers, in one run.

1. ``ContrastiveExcitationBackprop`` (cMWP) against TorchRay's ``contrastive_excitation_backprop``
   on the same model and inputs (TorchRay gets a copy with ``update_resnet`` and ReLUs not in
   place, as it needs): at batch 1 (target: at least as fast, ratio <= 1) and per image at
   batch 16, ours batched against TorchRay one image at a time as its pointing-game benchmark
   runs it (target: at least 3x faster, ratio <= 0.333); TorchRay batched at 16 is reported too.
   ResNet-18 (saliency ``layer3``, contrast ``avgpool``) and VGG-11 (pool4, relu7).
2. ``FullGrad`` against pytorch-grad-cam's ``FullGrad`` on ResNet-18, per image at batch 16
   (target: at least 2x faster, ratio <= 0.5).

Each pair is timed interleaved (ours, peer, ours, peer, ...) and the medians are compared, so
that drifting machine load affects both alike. Run:
``python benchmarks/bench_transfer.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, print_table, row  # noqa: E402

from captum_consistency.attr import ContrastiveExcitationBackprop, FullGrad  # noqa: E402

CMWP_LAYERS = {
    "resnet18": ("layer3", "avgpool", "fc"),
    "vgg11": ("features.15", "classifier.4", "classifier.6"),
}


def _interleaved(
    ours: Callable[[], object], peer: Callable[[], object], repeats: int, sync: Optional[Callable] = None
) -> Tuple[float, float]:
    """Median seconds of ``ours()`` and ``peer()``, alternated, after one warm-up call each."""
    times: Tuple[List[float], List[float]] = ([], [])
    for fn in (ours, peer):
        fn()
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (peer, times[1])):
            if sync:
                sync()
            start = time.perf_counter()
            fn()
            if sync:
                sync()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _torchray_copy(model: nn.Module) -> nn.Module:
    from torchray.attribution.excitation_backprop import update_resnet

    peer = copy.deepcopy(model)
    for m in peer.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    if isinstance(peer, torchvision.models.ResNet):
        peer = update_resnet(peer)
    return peer


def bench_cmwp(arch: str, device: torch.device, size: int, batch: int, repeats: int) -> List[Dict]:
    from torchray.attribution.excitation_backprop import contrastive_excitation_backprop

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).to(device).eval()
    peer_model = _torchray_copy(model)
    layer, contrast, classifier = CMWP_LAYERS[arch]
    ours = ContrastiveExcitationBackprop(model, layer, contrast, classifier)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def peer_call(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        return contrastive_excitation_backprop(peer_model, xs, ts, layer, contrast, classifier)

    rows = []
    ours_1, peer_1 = _interleaved(
        lambda: ours.attribute(x[:1], target[:1]), lambda: peer_call(x[:1], target[:1]), repeats, sync
    )
    rows.append(row(f"cMWP {arch} {size}px b1", ours_1, "TorchRay b1", peer_1, "<= 1.0", ours_1 <= peer_1))
    ours_b, peer_b = _interleaved(
        lambda: ours.attribute(x, target), lambda: peer_call(x, target), max(repeats // 2, 2), sync
    )
    # per image: ours batched / batch against TorchRay one image at a time (its b1 median above
    # is the same call on the same model; re-measured here over the batch's images)
    per_image_peer = []
    for i in range(batch):
        start = time.perf_counter()
        peer_call(x[i : i + 1], target[i : i + 1])
        if sync:
            sync()
        per_image_peer.append(time.perf_counter() - start)
    peer_pi = statistics.median(per_image_peer)
    ours_pi = ours_b / batch
    rows.append(
        row(f"cMWP {arch} {size}px per image @b{batch}", ours_pi, "TorchRay per image (b1)", peer_pi,
            "<= 0.333", ours_pi <= peer_pi / 3)
    )
    rows.append(
        row(f"cMWP {arch} {size}px per image @b{batch}", ours_pi, f"TorchRay batched b{batch}",
            peer_b / batch, "<= 1.0", ours_b <= peer_b)
    )
    return rows


def bench_fullgrad(device: torch.device, size: int, batch: int, repeats: int) -> List[Dict]:
    from pytorch_grad_cam import FullGrad as GradCamFullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    ours = FullGrad(model)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning about target_layers
        peer = GradCamFullGrad(model, [])
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    ours_s, peer_s = _interleaved(lambda: ours.attribute(x, target), lambda: peer(x, targets), repeats, sync)
    return [
        row(f"FullGrad resnet18 {size}px per image @b{batch}", ours_s / batch,
            "pytorch-grad-cam FullGrad", peer_s / batch, "<= 0.5", ours_s <= peer_s / 2)
    ]


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="112px images, batch 8, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = 112 if args.quick else 224
    batch = 8 if args.quick else 16
    repeats = 3 if args.quick else 7
    rows: List[Dict] = []
    for arch in CMWP_LAYERS:
        rows += bench_cmwp(arch, device, size, batch, repeats)
    rows += bench_fullgrad(device, size, batch, repeats)
    return rows


if __name__ == "__main__":
    print(f"# bench_transfer on {machine()}")
    print_table(main())
