"""Shared timing and table helpers for the benchmark scripts."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List

import torch


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync=None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(benchmark: str, ours_s: float, peer: str, peer_s: float, target: str, ok: bool) -> Dict:
    """One result row; ``ratio`` is ours / peer (below 1 means faster than the peer)."""
    return {
        "benchmark": benchmark,
        "ours_s": ours_s,
        "peer": peer,
        "peer_s": peer_s,
        "ratio": ours_s / peer_s if peer_s > 0 else float("nan"),
        "target": target,
        "ok": bool(ok),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {dev}"


def print_table(rows: List[Dict]) -> None:
    header = f"{'benchmark':58s} {'ours (s)':>10s} {'peer':>24s} {'peer (s)':>10s} {'ratio':>8s} {'target':>18s}  ok"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['benchmark'][:58]:58s} {r['ours_s']:10.4f} {r['peer'][:24]:>24s} {r['peer_s']:10.4f} "
            f"{r['ratio']:8.3f} {r['target'][:18]:>18s}  {'yes' if r['ok'] else 'NO'}"
        )
