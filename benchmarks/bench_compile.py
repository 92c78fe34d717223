"""A GC training step with ``torch.compile`` against the same step in eager mode.

``GradCamConsistencyLoss`` refuses a model compiled as a whole (its forward hook on the
Grad-CAM layer would not see the activations of the compiled graph) and documents the way
that works: compile the modules *before* the layer in place, leaving the layer and the head
(through which the loss backpropagates twice) eager. This benchmark times one per-image GC
step (forwards, loss, double backward, SGD step) of a ResNet-18 so compiled against the eager
step, on the same inputs, interleaved, after warm-up runs that include the compilations (the
images and the composites are two shapes), and checks that both steps give the same loss. The ratio is
information (``compiled / eager``; below 1: compilation pays), there is no target on it.

Run: ``python benchmarks/bench_compile.py [--quick] [--device cuda] [--backend inductor]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import Dict, List

import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, print_table, row, time_call  # noqa: E402

from captum_consistency import GradCamConsistencyLoss  # noqa: E402

#: The modules of a torchvision ResNet that run before ``layer4``, compiled in place.
BEFORE_LAYER4 = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


def bench_compiled_gc_step(device: torch.device, batch: int, size: int, repeats: int,
                           backend: str) -> List[Dict]:
    # Every BasicBlock shares one forward code object, so the 6 blocks x 2 shapes exceed
    # dynamo's default of 8 graphs per code object (beyond it, the rest would run eager).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=100).to(device).train()
    compiled = copy.deepcopy(eager)
    for name in BEFORE_LAYER4:
        # dynamic=False: the images and the composites (two sizes) get a graph each (with
        # dynamic shapes, inductor 2.x asserts the first graph's strides on the second)
        getattr(compiled, name).compile(backend=backend, dynamic=False)
    x = torch.randn(batch, 3, size, size, device=device)
    z = torch.randn(batch, 3, 3, size, size, device=device)
    y = torch.randperm(100)[:batch].to(device)
    cells = torch.randint(0, 4, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def step_of(model):
        loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=25.0)
        # lr 0: the weights stay put, so every repeat (and both models) sees the same step
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            out = loss_fn(x, y, z, cells=cells)
            out.loss.backward()
            opt.step()
            losses.append(out.loss.detach())

        return step, losses

    eager_step, eager_losses = step_of(eager)
    compiled_step, compiled_losses = step_of(compiled)
    for _ in range(2):  # warm-up: the compilations (two shapes), the allocator
        eager_step()
        compiled_step()
    # Interleaved (eager, compiled, eager, ...): drifting machine load hits both alike.
    times = {eager_step: [], compiled_step: []}
    for _ in range(repeats):
        for step in times:
            times[step].append(time_call(step, repeats=1, warmup=0, sync=sync))
    eager_s, compiled_s = (statistics.median(times[s]) for s in (eager_step, compiled_step))
    same = torch.allclose(eager_losses[-1], compiled_losses[-1], rtol=1e-4, atol=1e-5)
    return [row(f"GC step, parts before layer4 compiled ({backend}) b{batch} {size}px",
                compiled_s, "the eager GC step", eager_s, "information", same)]


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 4 at 96 px, 3 repeats")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch, size, repeats = (4, 96, 3) if args.quick else (16, 224, 5)
    return bench_compiled_gc_step(device, batch, size, repeats, args.backend)


if __name__ == "__main__":
    print(f"# bench_compile on {machine()}")
    rows = main()
    print_table(rows)
    for r in rows:
        print(f"compiled / eager GC step: {r['ratio']:.3f}")
