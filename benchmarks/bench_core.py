"""Cost of the GC loss and of element-wise Grad-CAM against their peers, in one run.

1. One GC training step with per-image composites (224 images + their 448 composites:
   forwards, loss, double backward, SGD step) against one plain cross-entropy step on the 224
   images plus one on the 448 composites. Target: ratio at most 1.05 (at ``layer4`` the double
   backward only reaches the head).
2. One GC step with shared composites (``composites="shared"``: the batch of 8, of distinct
   classes, grouped into 2 composites, grouping included) against one cross-entropy step on
   the same 224 batch. Target: at most 2.2 (the composites hold the batch's pixels once
   more). In the same run: the per-image step against that cross-entropy step, and against
   the shared step (information).
3. ``LayerElementwiseGradCam`` against Captum's ``LayerGradCam`` (target: at most 1.1x its
   time) and pytorch-grad-cam's ``HiResCAM`` (target: at least 3x faster), batch 32.

Run: ``python benchmarks/bench_core.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, print_table, row, time_call  # noqa: E402

from captum_consistency import GradCamConsistencyLoss  # noqa: E402
from captum_consistency.attr import LayerElementwiseGradCam  # noqa: E402


def bench_gc_step(device: torch.device, batch: int, size: int, repeats: int) -> List[Dict]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=100).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    z = torch.randn(batch, 3, 3, size, size, device=device)
    # Distinct classes (as in an ImageNet batch), so that the shared mode groups every image.
    y = torch.randperm(100)[:batch].to(device)
    cells = torch.randint(0, 4, (batch,), device=device)
    from captum_consistency import compose_grid

    composite = compose_grid(x, z, cells=cells)
    loss_fn = GradCamConsistencyLoss(model, model.layer4, lam=25.0)
    shared_fn = GradCamConsistencyLoss(model, model.layer4, lam=25.0, composites="shared",
                                       generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    ungrouped = []

    def gc_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(x, y, z, cells=cells).loss.backward()
        opt.step()

    def gc_shared_step():
        opt.zero_grad(set_to_none=True)
        out = shared_fn(x, y)  # grouping, composites, maps: all inside the timed step
        out.loss.backward()
        opt.step()
        ungrouped.append(out.num_ungrouped)

    def ce_step(inp):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(inp), y).backward()
        opt.step()

    def ce_steps():
        for inp in (x, composite):
            ce_step(inp)

    steps = {"gc": gc_step, "ce_pair": ce_steps, "gc_shared": gc_shared_step, "ce_224": lambda: ce_step(x)}
    # Interleave them so that drifting machine load affects all alike.
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for r in range(repeats):
        for name, fn in steps.items():
            times[name].append(time_call(fn, repeats=1, warmup=1 if r == 0 else 0, sync=sync))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return [
        row(f"GC step per-image ResNet-18 b{batch} {size}+{2 * size}px", med["gc"],
            f"CE step {size} + CE step {2 * size}", med["ce_pair"], "<= 1.05", med["gc"] / med["ce_pair"] <= 1.05),
        row(f"GC step shared b{batch}: {batch // 4} composites, {max(ungrouped)} ungrouped",
            med["gc_shared"], f"CE step {size} (same batch)", med["ce_224"], "<= 2.2",
            med["gc_shared"] / med["ce_224"] <= 2.2),
        row(f"GC step per-image b{batch}", med["gc"], f"CE step {size} (same batch)", med["ce_224"],
            "info", True),
        row(f"GC step per-image b{batch}", med["gc"], "GC step shared", med["gc_shared"], "info", True),
    ]


def bench_attribution(device: torch.device, batch: int, size: int, repeats: int) -> List[Dict]:
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=100).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 100, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    ours_cam = LayerElementwiseGradCam(model, model.layer4)
    captum_cam = LayerGradCam(model, model.layer4)
    ours = time_call(lambda: ours_cam.attribute(x, target=target, relu_attributions=True), repeats, sync=sync)
    captum = time_call(lambda: captum_cam.attribute(x, target=target, relu_attributions=True), repeats, sync=sync)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    hires = HiResCAM(model=model, target_layers=[model.layer4])
    pgc = time_call(lambda: hires(input_tensor=x, targets=targets), repeats, sync=sync)
    # The timed call returns a real map (its equality with HiResCAM is in the tests).
    ours_map = ours_cam.attribute(x, target=target, relu_attributions=True)
    rows = [
        row(f"LayerElementwiseGradCam b{batch} {size}px", ours, "captum LayerGradCam", captum, "<= 1.1", ours / captum <= 1.1),
        row(f"LayerElementwiseGradCam b{batch} {size}px", ours, "pytorch-grad-cam HiResCAM", pgc, "<= 0.333",
            ours / pgc <= 1 / 3 and bool(torch.isfinite(ours_map).all())),
    ]
    if device.type == "cpu":
        # Information: on the CPU our plain attribution runs the forward pass on channels-last
        # tensors (faster with oneDNN); here the peers get channels-last inputs too,
        # which isolates the gain of skipping the backbone's backward pass.
        xc = x.contiguous(memory_format=torch.channels_last)
        ours_c = time_call(lambda: ours_cam.attribute(xc, target=target, relu_attributions=True), repeats, sync=sync)
        captum_c = time_call(lambda: captum_cam.attribute(xc, target=target, relu_attributions=True), repeats, sync=sync)
        pgc_c = time_call(lambda: hires(input_tensor=xc, targets=targets), repeats, sync=sync)
        rows += [
            row(f"same, all given channels-last b{batch}", ours_c, "captum LayerGradCam", captum_c, "info", True),
            row(f"same, all given channels-last b{batch}", ours_c, "pytorch-grad-cam HiResCAM", pgc_c, "info", True),
        ]
    return rows


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller images, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = 112 if args.quick else 224
    repeats = 3 if args.quick else 7
    rows = bench_gc_step(device, batch=8, size=size, repeats=repeats)
    rows += bench_attribution(device, batch=32, size=size, repeats=repeats)
    return rows


if __name__ == "__main__":
    print(f"# bench_core on {machine()}")
    print_table(main())
