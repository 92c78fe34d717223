"""The interpretation metrics against Quantus and TorchRay on the same maps, in one run.

For 256 saliency maps of 224x224 (random non-negative maps, masks made of random boxes, random
positive cells), each metric is timed against its peer on the same inputs and the values are
checked to be equal:

* Content Heatmap vs ``quantus.RelevanceMassAccuracy`` (target: at least 50x faster);
* Negative Quadrants Heatmap vs ``1 - quantus.Focus`` (target: at least 50x faster);
* Pointing Game at tolerance 1 vs ``quantus.PointingGame`` (no margin; target 50x faster);
* Pointing Game at tolerance 15 vs TorchRay's ``PointingGame.evaluate`` per map, and the
  Stochastic Pointing Game (100 draws) vs TorchRay's ``evaluate`` on each of the same draws
  (Quantus has neither; target: faster, with equal values);
* all four metrics together (SPG with 100 draws): target under 0.5 s; and the
  ``InterpretationMetrics`` accumulator (SPG 5 runs x 100 draws) on the same batch.

Quantus' public ``__call__`` spends most of its time validating the attributions (it builds a
Python ``set`` of every attribution value); rows marked "kernel" time its vectorised NumPy
``evaluate_batch`` alone, for an apples-to-apples view of the arithmetic (no target).

Run: ``python benchmarks/bench_metrics.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, print_table, row, time_call  # noqa: E402

from captum_consistency.metrics import (  # noqa: E402
    InterpretationMetrics,
    content_heatmap,
    negative_quadrants_heatmap,
    pointing_game,
    stochastic_pointing_game,
)

SPEEDUP_TARGET = 50.0
ALL_FOUR_TARGET_S = 0.5


def make_inputs(n: int, size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    saliency = torch.rand(n, size, size, generator=gen) ** 4
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    corners = torch.randint(0, size * 3 // 4, (n, 2), generator=gen)
    extents = torch.randint(size // 8, size // 2, (n, 2), generator=gen)
    rows = torch.arange(size)
    y_in = (rows >= corners[:, :1]) & (rows < corners[:, :1] + extents[:, :1])  # (n, size)
    x_in = (rows >= corners[:, 1:]) & (rows < corners[:, 1:] + extents[:, 1:])
    masks = y_in[:, :, None] & x_in[:, None, :]
    cells = torch.randint(0, 4, (n,), generator=gen)
    return saliency, masks, cells


def _quantus_inputs(saliency: torch.Tensor, masks: torch.Tensor):
    n, h, w = saliency.shape
    return dict(
        x_batch=np.zeros((n, 3, h, w), np.float32),
        y_batch=np.zeros(n, np.int64),
        a_batch=saliency.unsqueeze(1).numpy(),
        s_batch=masks.unsqueeze(1).numpy().astype(np.float32),
    )


def _speed_row(name, ours_s, peer, peer_s, equal) -> Dict:
    ok = equal and ours_s * SPEEDUP_TARGET <= peer_s
    return row(name, ours_s, peer, peer_s, f"<= {1 / SPEEDUP_TARGET:.3f}, equal", ok)


def _faster_row(name, ours_s, peer, peer_s, equal) -> Dict:
    return row(name, ours_s, peer, peer_s, "< 1, equal", equal and ours_s < peer_s)


def _info_row(name, ours_s, peer, peer_s, equal) -> Dict:
    return row(name, ours_s, peer, peer_s, "equal (info)", equal)


def bench_quantus(saliency, masks, cells, repeats: int) -> List[Dict]:
    import quantus

    n, h, w = saliency.shape
    q = _quantus_inputs(saliency, masks)
    rows = []

    # Content heatmap vs RelevanceMassAccuracy.
    rma = quantus.RelevanceMassAccuracy(normalise=False, abs=False, disable_warnings=True)
    theirs = {}
    peer_s = time_call(lambda: theirs.setdefault("v", rma(model=None, batch_size=n, **q)), 1, 0)
    ours = content_heatmap(saliency, masks)
    equal = np.allclose(ours.numpy(), np.asarray(theirs["v"]), rtol=1e-5, atol=1e-6)
    ours_s = time_call(lambda: content_heatmap(saliency, masks), repeats)
    rows.append(_speed_row(f"content_heatmap {n}x{h}x{w}", ours_s, "quantus RelevanceMassAcc.", peer_s, equal))
    kernel_s = time_call(lambda: rma.evaluate_batch(a_batch=q["a_batch"], s_batch=q["s_batch"]), repeats)
    rows.append(_info_row(f"content_heatmap {n}x{h}x{w} (kernel)", ours_s, "RMA.evaluate_batch", kernel_s, equal))

    # Negative quadrants heatmap vs Focus (Focus insists on a model; it is not called).
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    focus = quantus.Focus(normalise=False, abs=False, disable_warnings=True)
    quadrants = torch.nn.functional.one_hot(cells, 4).numpy()
    fq = {k: v for k, v in q.items() if k != "s_batch"}
    peer_s = time_call(
        lambda: theirs.__setitem__("f", focus(model=model, batch_size=n, custom_batch=quadrants, **fq)), 1, 0
    )
    ours = negative_quadrants_heatmap(saliency, cells)
    equal = np.allclose(ours.numpy(), 1 - np.asarray(theirs["f"]), rtol=1e-5, atol=1e-6)
    ours_s = time_call(lambda: negative_quadrants_heatmap(saliency, cells), repeats)
    rows.append(_speed_row(f"negative_quadrants_heatmap {n}x{h}x{w}", ours_s, "1 - quantus Focus", peer_s, equal))
    kernel_s = time_call(lambda: focus.evaluate_batch(a_batch=q["a_batch"], c_batch=quadrants), repeats)
    rows.append(_info_row(f"negative_quadrants_heatmap {n}x{h}x{w} (kernel)", ours_s, "Focus.evaluate_batch", kernel_s, equal))

    # Pointing game without margin vs Quantus' PointingGame.
    qpg = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True)
    peer_s = time_call(lambda: theirs.__setitem__("p", qpg(model=None, batch_size=n, **q)), 1, 0)
    ours = pointing_game(saliency, masks, tolerance=1)
    equal = np.array_equal(ours.numpy(), np.asarray(theirs["p"], dtype=np.float32))
    ours_s = time_call(lambda: pointing_game(saliency, masks, tolerance=1), repeats)
    rows.append(_speed_row(f"pointing_game tol 1 {n}x{h}x{w}", ours_s, "quantus PointingGame", peer_s, equal))
    kernel_s = time_call(lambda: qpg.evaluate_batch(a_batch=q["a_batch"], s_batch=q["s_batch"]), repeats)
    rows.append(_info_row(f"pointing_game tol 1 {n}x{h}x{w} (kernel)", ours_s, "PG.evaluate_batch", kernel_s, equal))
    return rows


def _torchray_hits(game, masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """TorchRay's test, one call per (map, point): the reference loop."""
    w = masks.shape[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.tensor(
            [
                [game.evaluate(masks[i], (int(p) % w, int(p) // w)) == 1 for p in points[i].tolist()]
                for i in range(len(points))
            ]
        )


def bench_torchray(saliency, masks, repeats: int, spg_maps: int) -> List[Dict]:
    from torchray.benchmark.pointing_game import PointingGame

    n, h, w = saliency.shape
    game = PointingGame(num_classes=1, tolerance=15)
    rows = []

    argmax = saliency.flatten(1).argmax(1, keepdim=True)
    theirs = {}
    peer_s = time_call(lambda: theirs.__setitem__("pg", _torchray_hits(game, masks, argmax)), 1, 0)
    ours = pointing_game(saliency, masks, tolerance=15)
    equal = torch.equal(ours, theirs["pg"].squeeze(1).float())
    ours_s = time_call(lambda: pointing_game(saliency, masks, tolerance=15), repeats)
    rows.append(_faster_row(f"pointing_game tol 15 {n}x{h}x{w}", ours_s, "torchray PointingGame", peer_s, equal))

    # SPG: TorchRay's test on each of the same 100 draws (the generator is replayed).
    s, m = saliency[:spg_maps], masks[:spg_maps]
    points = torch.multinomial(s.flatten(1), 100, replacement=True, generator=torch.Generator().manual_seed(1))
    peer_s = time_call(lambda: theirs.__setitem__("spg", _torchray_hits(game, m, points)), 1, 0)
    ours = stochastic_pointing_game(s, m, 15, 100, generator=torch.Generator().manual_seed(1))
    equal = torch.equal(ours, theirs["spg"].float().mean(1))
    ours_s = time_call(
        lambda: stochastic_pointing_game(s, m, 15, 100, generator=torch.Generator().manual_seed(1)), repeats
    )
    rows.append(
        _faster_row(f"stochastic_pointing_game 100 {spg_maps}x{h}x{w}", ours_s, "torchray evaluate x100", peer_s, equal)
    )
    return rows


def bench_all_four(saliency, masks, cells, repeats: int, peer_s: float, device: torch.device) -> List[Dict]:
    n, h, w = saliency.shape
    saliency, masks, cells = saliency.to(device), masks.to(device), cells.to(device)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    gen = torch.Generator(device=device).manual_seed(0)

    def four():
        pointing_game(saliency, masks)
        stochastic_pointing_game(saliency, masks, generator=gen)
        content_heatmap(saliency, masks)
        negative_quadrants_heatmap(saliency, cells)

    def accumulate():
        metrics = InterpretationMetrics(generator=gen)
        metrics.update(saliency, masks, labels)
        metrics.update_nqh(saliency, cells)
        return metrics.compute()

    ours_s = time_call(four, repeats, sync=sync)
    acc_s = time_call(accumulate, repeats, sync=sync)
    return [
        row(f"PG+SPG100+CH+NQH {n}x{h}x{w} {device.type}", ours_s, "quantus CH+NQH+PG", peer_s,
            f"< {ALL_FOUR_TARGET_S} s", ours_s < ALL_FOUR_TARGET_S),
        row(f"InterpretationMetrics SPG 5x100 {n}x{h}x{w} {device.type}", acc_s, "quantus CH+NQH+PG", peer_s,
            f"< {ALL_FOUR_TARGET_S} s", acc_s < ALL_FOUR_TARGET_S),
    ]


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 maps and fewer repeats")
    parser.add_argument("--device", default="cpu", help="device of the all-four rows (peers run on CPU)")
    args = parser.parse_args(argv)
    n = 64 if args.quick else 256
    repeats = 3 if args.quick else 7
    saliency, masks, cells = make_inputs(n, 224)
    rows = bench_quantus(saliency, masks, cells, repeats)
    rows += bench_torchray(saliency, masks, repeats, spg_maps=16 if args.quick else 64)
    quantus_total = sum(r["peer_s"] for r in rows if r["peer"].startswith(("quantus", "1 - quantus")))
    rows += bench_all_four(saliency, masks, cells, repeats, quantus_total, torch.device(args.device))
    return rows


if __name__ == "__main__":
    print(f"# bench_metrics on {machine()}")
    print_table(main(sys.argv[1:]))
