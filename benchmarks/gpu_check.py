"""The recipes on a GPU in one run (issue 25): throughput, cost ratios, bf16, a short ImageNet run.

One prepared script for a GPU machine, sized for about 4 minutes on an H200 (an estimate: not
run on a GPU yet); the default ``--time-budget`` of 480 s fails the step that would run past
8 minutes. ``--device cpu --backend gloo --tiny`` runs every step with tiny sizes on the CPU
(``tests/test_gpu_check.py``). Four steps, each with its figures and its checks:

1. ``benchmarks/gpu_train_throughput.py`` for ResNet-18 and ResNet-50 (``--archs``) at
   ``S = 224`` px, bf16 autocast, batch 128: images per second of baseline (cross-entropy),
   per-image GC and shared GC training, and the step ratios against their targets, printed
   as ``PASS`` / ``FAIL`` lines: per-image GC step <= 1.05 x (CE@S + CE@2S), shared GC step
   <= 2.2 x CE@S.
2. ``recipes/train.py --composites shared --amp`` for ``--steps`` (200) steps, ResNet-18, the
   same batch and size, ``--workers`` at the machine's cores (two epochs of ``steps / 2``),
   on an ImageNet-format folder of full-size JPEGs written for the run
   (``tests/_fixtures_data.make_imagenet_folder``: photographs of 375 x 500, 500 x 375 and
   333 x 500, a few distinct ones per class, the rest hard links, so that writing the folder
   takes seconds; decoding costs the same). Reported: images per second in the second epoch,
   steady (between its first and last logged steps, from the TensorBoard scalars' wall
   times, ``--log-every`` a tenth of an epoch) and over the whole epoch (loader start-up and
   checkpoint included), and which side is the bottleneck: the GPU utilisation sampled in the
   steady window (``nvidia-smi``, else ``torch.cuda.utilization()``), and the steady rate
   against the shared GC step's on preloaded tensors (step 1, same batch and size). Below
   85 % utilisation (or, without a utilisation reading, below 85 % of the preloaded rate)
   the verdict is "data loading", else the device.
3. The same run under ``torchrun --nproc_per_node 1`` (``--backend``, NCCL on CUDA), after
   one training JPEG is corrupted, with ``--skip-corrupt``: each epoch must count the
   undecodable image (``train.skipped == 1``, one image fewer trained on, every step taken).
   A batch of ``B > 1`` images only shrinks, so a second ``torchrun`` run at ``--batch-size 1``
   on eight images with one corrupt JPEG checks that the empty batch's step is skipped and
   counted (``train.skipped_steps == 1``). With one process ``init_distributed`` starts no
   process group (``WORLD_SIZE`` is 1) and the training loop takes no vote, so the vote's NCCL
   path is checked here directly: an NCCL default group of one process (``tcp://``), then
   ``engine.all_ranks_true`` (its gloo side group) and ``engine.all_reduce_sum`` (NCCL).
4. ``recipes/evaluate.py`` on step 2's checkpoint (element-wise Grad-CAM, strict float32) on
   the folder's validation split with VOC boxes, at ``--batch-size B`` and at 1 (the batch-1
   protocol; PG must be identical and CH equal to 1e-6), and the authors' batch-1 TorchRay
   loop (``benchmarks/bench_evaluation.authors_protocol``, when TorchRay is installed):
   images per second of each.

Writes ``<out>/gpu_check.json`` (every figure, the GPU, torch version and date),
``<out>/gpu_check.md`` (a block for ``docs/benchmarks.md``) and the recipes' logs
(``<out>/*.log``); the data and the runs go to a temporary folder, removed at the end unless
``--keep-work`` (or to ``--work-dir``, kept). Exit status 0 when every step ran and every
check held (a performance target missed is a ``FAIL`` line and ``targets_failed`` in the
JSON, not an error); 1, with a message naming the step or the option, when options cannot
run together, a step failed, a check did not hold, or the time budget ran out; 2 for an
option that argparse refuses.

Run: ``python benchmarks/gpu_check.py --out gpu_check`` (on the GPU machine), or
``python benchmarks/gpu_check.py --device cpu --backend gloo --tiny --out /tmp/gc``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402

import gpu_train_throughput  # noqa: E402
from bench_evaluation import PHOTO_SIZES  # noqa: E402
from tests._fixtures_data import corrupt_file, make_imagenet_folder  # noqa: E402
from tests._recipes import load_recipe, run_recipe  # noqa: E402

PER_IMAGE_TARGET = 1.05  # per-image GC step / (CE@S + CE@2S)
SHARED_TARGET = 2.2  # shared GC step / CE@S
BOTTLENECK_FRACTION = 0.85  # utilisation (or loader / preloaded rate) below this: data loading


class StepFailed(Exception):
    """A step could not run, or what it ran does not hold; the message names the step."""


@dataclass
class Config:
    archs: List[str]
    batch_size: int
    image_size: int
    bench_steps: int
    bench_rounds: int
    bench_warmup: int
    steps: int
    classes: int
    unique_per_class: int
    val_per_class: int
    photo_sizes: Sequence[Tuple[int, int]]
    workers: int

    @property
    def steps_per_epoch(self) -> int:
        return self.steps // 2


@dataclass
class Report:
    """The figures (``data``) and the PASS / FAIL lines (``rows``) of the run."""

    data: Dict[str, Any] = field(default_factory=dict)
    rows: List[Dict[str, Any]] = field(default_factory=list)

    def row(self, step: int, what: str, value: str, target: str = "info", ok: Optional[bool] = None,
            kind: str = "info") -> None:
        """``kind``: ``target`` (performance: a miss is reported) or ``check`` (must hold)."""
        self.rows.append({"step": step, "what": what, "value": value, "target": target,
                          "ok": ok, "kind": kind})
        mark = {True: "PASS", False: "FAIL", None: "info"}[ok]
        goal = f" (target {target})" if target != "info" else ""
        print(f"[step {step}] {mark:4s} {what}: {value}{goal}", flush=True)


class Budget:
    """The time budget: what each subprocess may still take."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def left(self, step: str) -> float:
        left = self.seconds - (time.monotonic() - self.start)
        if left <= 0:
            raise StepFailed(f"{step}: the time budget of {self.seconds:.0f} s ran out before it "
                             "(raise --time-budget, or lower --steps)")
        return left


# ----------------------------------------------------------------------------- helpers


def _env() -> Dict[str, str]:
    """A recipe subprocess' environment: the package importable, no inherited torchrun world."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _num(x: Optional[float]) -> str:
    """A rate for the table: whole numbers from 100 up, three significant digits below."""
    if x is None:
        return "n/a"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run(cmd: List[str], log: Path, step: str, budget: Budget) -> float:
    """Runs ``cmd`` with its output in ``log``; returns its wall time; raises StepFailed."""
    timeout = budget.left(step)
    start = time.perf_counter()
    with open(log, "w") as sink:
        sink.write("$ " + " ".join(cmd) + "\n")
        sink.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its ranks on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise StepFailed(f"{step}: still running when the time budget ran out "
                             f"({timeout:.0f} s left); log {log}:\n{_tail(log)}") from None
    if rc != 0:
        raise StepFailed(f"{step}: exit status {rc}; log {log}:\n{_tail(log)}")
    return time.perf_counter() - start


def _records(run_dir: Path, step: str) -> List[Dict[str, Any]]:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise StepFailed(f"{step}: {log} was not written")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_utilisation(index: int) -> Optional[float]:
    """Percent of the last sample period the GPU was busy; None without a way to read it."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", str(index)], capture_output=True, text=True, timeout=10)
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            pass
    try:
        return float(torch.cuda.utilization(index))
    except Exception:  # pynvml missing, or no NVML: no reading
        return None


class UtilisationSampler(threading.Thread):
    """Samples the GPU's utilisation every ``interval`` s, with the (epoch) time of each sample."""

    def __init__(self, index: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.index, self.interval = index, interval
        self.samples: List[Tuple[int, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            value = _gpu_utilisation(self.index)
            if value is None:
                return
            self.samples.append((time.time(), value))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=15)

    def mean(self, start: float, end: float) -> Optional[float]:
        values = [v for t, v in self.samples if start <= t <= end]
        return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- data


def make_train_folder(root: Path, cfg: Config) -> Dict[str, Any]:
    """An ImageNet-format folder: ``steps_per_epoch x batch`` training JPEGs, validation + boxes.

    ``unique_per_class`` distinct photographs per class are written, the others are hard links
    to them (copies where links fail), spread so that every epoch has exactly
    ``steps_per_epoch`` full batches (no image dropped, so a corrupt one is met every epoch).
    """
    total = cfg.steps_per_epoch * cfg.batch_size
    if total < cfg.classes:
        raise StepFailed(f"data: {total} training images are fewer than --classes {cfg.classes}")
    per_class = [total // cfg.classes + (1 if c < total % cfg.classes else 0) for c in range(cfg.classes)]
    unique = min(cfg.unique_per_class, min(per_class))
    fx = make_imagenet_folder(root, num_classes=cfg.classes, images_per_class=unique, splits=("train",),
                              boxes_splits=(), image_sizes=cfg.photo_sizes, seed=0)
    by_class: Dict[int, List[Path]] = {}
    for path, label in zip(fx.files["train"], fx.labels["train"]):
        by_class.setdefault(label, []).append(Path(path))
    for c, files in by_class.items():
        for k in range(per_class[c] - len(files)):
            src = files[k % len(files)]
            dst = src.with_name(f"{src.stem}_copy{k}{src.suffix}")
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    val = make_imagenet_folder(root, num_classes=cfg.classes, images_per_class=cfg.val_per_class,
                               splits=("val",), boxes_splits=("val",), image_sizes=cfg.photo_sizes,
                               seed=1)
    return {"root": str(root), "train_images": total, "distinct_train_images": unique * cfg.classes,
            "val_images": len(val.files["val"]), "boxes": val.boxes_dirs["val"],
            "first_train_file": fx.files["train"][min(5, len(fx.files["train"]) - 1)],
            "photo_sizes": [list(s) for s in cfg.photo_sizes], "classes": cfg.classes}


def corrupt_own_copy(path: Path) -> None:
    """Corrupts ``path`` without touching the files it is a hard link of."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    corrupt_file(path)


# ----------------------------------------------------------------------------- steps


def step_throughput(cfg: Config, device: torch.device, report: Report) -> Dict[str, Any]:
    results = {}
    s = cfg.image_size
    benchmark_mode = torch.backends.cudnn.benchmark  # the throughput script turns it on
    for arch in cfg.archs:
        try:
            r = gpu_train_throughput.run(cfg.batch_size, s, cfg.bench_steps, warmup=cfg.bench_warmup,
                                         rounds=cfg.bench_rounds, device=device, amp=True, arch=arch)
        except Exception as e:  # e.g. out of memory: the other models and steps still run
            message = (str(e).strip().splitlines() or [""])[0]
            results[arch] = {"error": f"{type(e).__name__}: {message}"}
            report.row(1, f"{arch} b{cfg.batch_size} {s}px bf16: the throughput run",
                       f"failed: {results[arch]['error']}", "runs", False, "check")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results[arch] = r
        ips = r["images_per_s"]
        report.row(1, f"{arch} b{cfg.batch_size} {s}px bf16: images/s baseline / per-image GC / shared GC",
                   f"{_num(ips['baseline_ce_224'])} / {_num(ips['gc'])} / {_num(ips['gc_shared'])}")
        report.row(1, f"{arch}: per-image GC step / (CE@{s} + CE@{2 * s})",
                   f"{r['gc_over_ce224_plus_ce448']:.3f}", f"<= {PER_IMAGE_TARGET}", r["ok"], "target")
        report.row(1, f"{arch}: shared GC step / CE@{s} ({r['gc_shared_ungrouped_max']} ungrouped)",
                   f"{r['gc_shared_over_ce224']:.3f}", f"<= {SHARED_TARGET}", r["ok_shared"], "target")
    torch.backends.cudnn.benchmark = benchmark_mode  # evaluate.py (step 4) runs as users run it
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _train_args(data: Dict[str, Any], cfg: Config, out: Path, device: torch.device, batch_size: int,
                epochs: int, data_root: Optional[str] = None) -> List[str]:
    return [str(ROOT / "recipes" / "train.py"), "--data", "imagenet",
            "--data-root", data_root or data["root"],
            "--arch", "resnet18", "--composites", "shared", "--amp", "--batch-size", str(batch_size),
            "--image-size", str(cfg.image_size), "--epochs", str(epochs), "--workers", str(cfg.workers),
            "--device", device.type, "--lr", "0.01", "--no-val", "--no-progress",
            "--log-every", str(_log_every(cfg)), "--output-dir", str(out)]


def _torchrun() -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]


def _epoch_rate(record: Dict[str, Any]) -> float:
    return record["train"]["samples"] / record["time_s"]


def _log_every(cfg: Config) -> int:
    return max(1, cfg.steps_per_epoch // 10)


def steady_rate(run_dir: Path, after_step: int,
                batch_size: int) -> Tuple[Optional[float], Optional[Tuple[float, float]]]:
    """Images per second between the first and the last logged step after ``after_step``.

    From the wall times of the run's TensorBoard scalars (``loss/total``, one per
    ``--log-every`` steps): the second epoch without the loader's start-up and the checkpoint.
    Returns ``(rate, (start, end))`` in seconds since the epoch, or ``(None, None)`` with fewer
    than two logged steps there.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = [e for e in acc.Scalars("loss/total") if e.step > after_step]
    if len(events) < 2 or events[-1].wall_time <= events[0].wall_time:
        return None, None
    first, last = events[0], events[-1]
    rate = (last.step - first.step) * batch_size / (last.wall_time - first.wall_time)
    return rate, (first.wall_time, last.wall_time)


def step_train(cfg: Config, data: Dict[str, Any], device: torch.device, work: Path, out: Path,
               budget: Budget, preloaded: Optional[float], report: Report) -> Dict[str, Any]:
    step = "step 2 (recipes/train.py --composites shared --amp)"
    run_dir = work / "train"
    sampler = None
    if device.type == "cuda":
        sampler = UtilisationSampler(torch.cuda.current_device())
        sampler.start()
    try:
        wall = _run([sys.executable, *_train_args(data, cfg, run_dir, device, cfg.batch_size, 2)],
                    out / "train.log", step, budget)
    finally:
        if sampler is not None:
            sampler.stop()
    records = _records(run_dir, step)
    spe, b = cfg.steps_per_epoch, cfg.batch_size
    bad = [r["train"] for r in records
           if (r["train"]["steps"], r["train"]["samples"], r["train"]["skipped"]) != (spe, spe * b, 0)]
    if len(records) != 2 or bad or not (run_dir / "checkpoint.pth").is_file():
        raise StepFailed(f"{step}: expected 2 epochs of {spe} steps x {b} images, nothing skipped, "
                         f"and a checkpoint; got {[r['train'] for r in records]}")
    rate, window = steady_rate(run_dir, spe, b)
    util = sampler.mean(*window) if sampler is not None and window else None
    fraction = rate / preloaded if preloaded and rate else None
    if util is not None:
        bottleneck = "data loading" if util < 100 * BOTTLENECK_FRACTION else "GPU"
    elif fraction is not None:
        bottleneck = "data loading" if fraction < BOTTLENECK_FRACTION else device.type.upper()
    else:
        bottleneck = "unknown (no utilisation reading, no preloaded figure)"
    result = {
        "steps": sum(r["train"]["steps"] for r in records), "batch_size": b, "workers": cfg.workers,
        "log_every": _log_every(cfg), "epoch_time_s": [r["time_s"] for r in records],
        "images_per_s_steady_epoch2": rate, "images_per_s_epoch2": _epoch_rate(records[-1]),
        "images_per_s_epoch1": _epoch_rate(records[0]), "wall_s": wall,
        "gpu_utilisation_mean_epoch2": util,
        "gpu_utilisation_samples": len(sampler.samples) if sampler is not None else 0,
        "preloaded_shared_gc_images_per_s": preloaded, "loader_over_preloaded": fraction,
        "bottleneck": bottleneck, "ungrouped": [r["train"].get("ungrouped") for r in records],
        "checkpoint": str(run_dir / "checkpoint.pth"),
    }
    util_text = f"GPU busy {util:.0f} %" if util is not None else "no GPU utilisation reading"
    frac_text = f", {fraction:.2f} of the preloaded rate" if fraction is not None else ""
    report.row(2, f"train.py shared GC --amp, {result['steps']} steps x {b}, {cfg.workers} workers: "
               "images/s in epoch 2, steady (whole epoch)",
               f"{_num(rate)} ({_num(result['images_per_s_epoch2'])})")
    report.row(2, "bottleneck", f"{bottleneck} ({util_text}{frac_text})")
    return result


def torchrun_starts_group_with_one_process(device: torch.device) -> bool:
    """Whether ``init_distributed`` starts a process group under ``torchrun --nproc_per_node 1``."""
    from captum_consistency.engine import cleanup_distributed, init_distributed

    saved = dict(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    try:
        return init_distributed(device.type).distributed
    finally:
        cleanup_distributed()
        os.environ.clear()
        os.environ.update(saved)


def vote_probe(device: torch.device, backend: str) -> Dict[str, Any]:
    """``all_ranks_true`` and ``all_reduce_sum`` in a one-process group of ``backend``."""
    import torch.distributed as dist

    from captum_consistency.engine import all_ranks_true, all_reduce_sum, cleanup_distributed

    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1, **kwargs)
    try:
        used = str(dist.get_backend())
        votes = [all_ranks_true(True), all_ranks_true(False), all_ranks_true(True)]
        total = float(all_reduce_sum(torch.ones(1, device=device))[0])
    finally:
        cleanup_distributed()
    return {"backend": used, "votes": votes, "all_reduce_sum": total,
            "ok": votes == [True, False, True] and total == 1.0}


def step_torchrun(cfg: Config, data: Dict[str, Any], device: torch.device, backend: str, work: Path,
                  out: Path, budget: Budget, report: Report) -> Dict[str, Any]:
    step = "step 3 (torchrun --nproc_per_node 1 recipes/train.py --skip-corrupt)"
    victim = Path(data["first_train_file"])
    corrupt_own_copy(victim)
    run_dir = work / "torchrun"
    wall = _run([*_torchrun(), *_train_args(data, cfg, run_dir, device, cfg.batch_size, 2), "--skip-corrupt"],
                out / "torchrun_corrupt.log", step, budget)
    records = _records(run_dir, step)
    spe, b = cfg.steps_per_epoch, cfg.batch_size
    keys = ("skipped", "skipped_steps", "steps", "samples")
    counted = [tuple(r["train"][k] for k in keys) for r in records]
    if len(records) != 2 or any(c != (1, 0, spe, spe * b - 1) for c in counted):
        raise StepFailed(f"{step}: each epoch must count the corrupt JPEG {victim.name} "
                         f"(skipped 1, skipped_steps 0, {spe} steps, {spe * b - 1} images); got "
                         f"(skipped, skipped_steps, steps, samples) = {counted}")
    report.row(3, f"torchrun, batch {b}, 1 corrupt JPEG: (skipped images, skipped steps) per epoch",
               str([c[:2] for c in counted]), "(1, 0) each", True, "check")
    rate, _ = steady_rate(run_dir, spe, b)
    report.row(3, "torchrun run: images/s in epoch 2, steady (whole epoch)",
               f"{_num(rate)} ({_num(_epoch_rate(records[-1]))})")

    # Batch size 1: the corrupt image's batch is empty, so its step is skipped and counted.
    small = work / "small"
    fx = make_imagenet_folder(small, num_classes=4, images_per_class=2, splits=("train",),
                              boxes_splits=(), image_sizes=cfg.photo_sizes, seed=2)
    corrupt_file(fx.files["train"][5])
    run1 = work / "torchrun_b1"
    step1 = "step 3 (torchrun, --batch-size 1, one corrupt JPEG of 8)"
    _run([*_torchrun(), *_train_args(data, cfg, run1, device, 1, 1, data_root=str(small)), "--skip-corrupt"],
         out / "torchrun_batch1.log", step1, budget)
    record = _records(run1, step1)[-1]["train"]
    got = tuple(record[k] for k in keys)
    if got != (1, 1, 7, 7):
        raise StepFailed(f"{step1}: expected skipped 1, skipped_steps 1, 7 steps, 7 images; got "
                         f"(skipped, skipped_steps, steps, samples) = {got}")
    report.row(3, "torchrun, batch 1, 1 corrupt JPEG of 8: skipped steps counted",
               str(record["skipped_steps"]), "1", True, "check")

    group = torchrun_starts_group_with_one_process(device)
    report.row(3, "process group of recipes/train.py under torchrun --nproc_per_node 1",
               f"{'started' if group else 'none'} (engine.init_distributed starts one for WORLD_SIZE > 1; "
               "the training loop votes only with 2 or more processes)")
    probe = vote_probe(device, backend)
    report.row(3, f"all_ranks_true in a {probe['backend']} group of 1 (votes True/False/True, "
               "all_reduce_sum of 1)", f"{probe['votes']}, {probe['all_reduce_sum']:g}",
               "[True, False, True], 1", probe["ok"], "check")
    return {"corrupt_file": victim.name, "per_epoch": [dict(zip(keys, c)) for c in counted],
            "images_per_s_steady_epoch2": rate, "images_per_s_epoch2": _epoch_rate(records[-1]),
            "wall_s": wall, "batch1": dict(zip(keys, got)),
            "process_group_with_one_process": group, "vote_probe": probe}


def step_evaluate(cfg: Config, data: Dict[str, Any], ckpt: str, device: torch.device, work: Path,
                  budget: Budget, report: Report) -> Dict[str, Any]:
    step = "step 4 (recipes/evaluate.py)"
    evaluate = load_recipe("evaluate")
    common = ["--checkpoint", ckpt, "--data-root", data["root"], "--boxes", data["boxes"],
              "--workers", cfg.workers, "--device", device.type, "--no-progress"]
    n = data["val_images"]
    runs = {}
    for b in (cfg.batch_size, 1):
        budget.left(step)
        try:
            runs[b] = run_recipe(evaluate, common + ["--batch-size", b, "--output-dir", work / f"eval_b{b}"])
        except Exception as e:  # the recipe's own message names the problem
            raise StepFailed(f"{step} at --batch-size {b}: {type(e).__name__}: {e}") from e
    batched, single = runs[cfg.batch_size], runs[1]
    rate_b, rate_1 = n / batched["time_s"], n / single["time_s"]
    same = batched["pg"] == single["pg"] and abs(batched["ch"] - single["ch"]) <= 1e-6
    result = {"val_images": n, "images_per_s": {f"batch_{cfg.batch_size}": rate_b, "batch_1": rate_1},
              "time_s": {f"batch_{cfg.batch_size}": batched["time_s"], "batch_1": single["time_s"]},
              "speedup_over_batch_1": rate_b / rate_1,
              "metrics": {k: {m: r[m] for m in ("top1", "pg", "spg_mean", "ch", "nqh", "skipped")}
                          for k, r in (("batched", batched), ("batch_1", single))},
              "same_pg_ch": same}
    report.row(4, f"evaluate.py, {n} images: images/s at batch {cfg.batch_size} vs batch 1",
               f"{_num(rate_b)} vs {_num(rate_1)} ({rate_b / rate_1:.1f}x)")
    report.row(4, "PG identical and CH within 1e-6 at both batch sizes",
               f"PG {batched['pg']:.4f}/{single['pg']:.4f}, CH diff {abs(batched['ch'] - single['ch']):.1e}",
               "equal", same, "check")
    try:
        from bench_evaluation import authors_protocol
        import torchray  # noqa: F401  (the peer)
    except ImportError:
        result["authors_b1"] = None
        report.row(4, "authors' batch-1 loop", "not run: TorchRay is not installed")
        return result
    from captum_consistency.engine.datasets import build_dataset, load_model_from_checkpoint

    budget.left(step)
    model, meta = load_model_from_checkpoint(ckpt, device)
    whole = build_dataset("imagenet", "val", "whole", cfg.image_size, data_root=data["root"],
                          boxes=data["boxes"], classes=meta["classes"])
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid")  # inside TorchRay
        ref = authors_protocol(model.eval(), whole.dataset, meta["num_classes"], device)
    rate_a = n / (time.perf_counter() - start)
    result["authors_b1"] = {"images_per_s": rate_a, **ref}
    result["speedup_over_authors_b1"] = rate_b / rate_a
    report.row(4, f"evaluate.py batch {cfg.batch_size} (with NQH and top-1) vs the authors' batch-1 "
               "loop (PG, SPG, CH): images/s", f"{_num(rate_b)} vs {_num(rate_a)} ({rate_b / rate_a:.1f}x)")
    return result


# ----------------------------------------------------------------------------- output


def markdown(info: Dict[str, Any], rows: List[Dict[str, Any]], failed: Optional[str] = None) -> str:
    kind = "GPU" if info["device"] == "cuda" else "CPU"
    tiny = ", tiny sizes: a smoke run, not figures" if info["tiny"] else ""
    lines = [
        f"### {kind}: `python benchmarks/gpu_check.py` ({info['date']}{tiny})",
        "",
        f"- **Device**: {info['device_name']} ({info['cpu_cores']} CPU cores), torch {info['torch']} "
        f"(built with CUDA {info['cuda'] or 'none'}), torchvision {info['torchvision']}, bf16 autocast.",
        f"- **Date**: {info['date']}.",
        f"- **Command**: `{info['command']}` ({info['wall_s']:.0f} s).",
        "",
        "| step | figure | value | target | ok |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ok = {True: "PASS", False: "FAIL", None: "—"}[r["ok"]]
        lines.append(f"| {r['step']} | {r['what']} | {r['value']} | {r['target']} | {ok} |")
    if failed:
        lines += ["", f"**Failed**: {failed.splitlines()[0]}"]
    return "\n".join(lines) + "\n"


def config(args: argparse.Namespace) -> Config:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.tiny:
        cfg = Config(archs=["resnet18", "resnet50"], batch_size=4, image_size=64, bench_steps=1,
                     bench_rounds=1, bench_warmup=1, steps=4, classes=4, unique_per_class=2,
                     val_per_class=1, photo_sizes=((60, 80), (80, 60)), workers=min(2, cores))
    else:
        cfg = Config(archs=["resnet18", "resnet50"], batch_size=128, image_size=224, bench_steps=8,
                     bench_rounds=3, bench_warmup=3, steps=200, classes=100, unique_per_class=8,
                     val_per_class=1, photo_sizes=PHOTO_SIZES, workers=cores)
    for name in ("batch_size", "image_size", "steps", "workers", "classes"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.archs:
        cfg.archs = [a for a in args.archs.split(",") if a]
    if cfg.steps < 2 or cfg.steps % 2:
        raise SystemExit(f"gpu_check: --steps must be an even number >= 2 (two epochs), got {cfg.steps}")
    if cfg.classes < 4:
        raise SystemExit(f"gpu_check: --classes must be >= 4 (shared composites), got {cfg.classes}")
    return cfg


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backend", default=None, choices=("nccl", "gloo"),
                   help="process-group backend of step 3 (default: nccl on cuda, gloo on cpu)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and 4 steps (the CPU test)")
    p.add_argument("--out", required=True, help="gpu_check.json, gpu_check.md and the logs go here")
    p.add_argument("--steps", type=int, default=None, help="training steps of step 2 (default 200; tiny 4)")
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds for the whole run; a step that would run past it fails")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (tiny 4)")
    p.add_argument("--image-size", type=int, default=None, help="S (default 224; tiny 64, the smallest size at which a ResNet composite gives each cell 2x2 map locations)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the cores)")
    p.add_argument("--classes", type=int, default=None, help="classes of the folder (default 100)")
    p.add_argument("--archs", default="", help="step 1's models (default resnet18,resnet50)")
    p.add_argument("--work-dir", default=None, help="data and runs (default: a temporary folder)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = config(args)
    device = torch.device(args.device)
    expected = "nccl" if device.type == "cuda" else "gloo"
    backend = args.backend or expected
    if backend != expected:
        raise SystemExit(f"gpu_check: --backend {backend} with --device {device.type}: recipes/train.py "
                         f"under torchrun uses {expected} on {device.type} (engine.init_distributed)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: --device cuda but no CUDA device is available "
                             "(for the CPU smoke run: --device cpu --backend gloo --tiny)")
        device = torch.device("cuda", torch.cuda.current_device())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.time_budget)
    report = Report()
    info = {
        "benchmark": "gpu_check", "date": datetime.date.today().isoformat(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "backend": backend, "tiny": args.tiny,
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
    }
    failed: Optional[str] = None
    try:
        print(f"gpu_check on {info['device_name']}, torch {info['torch']}, work folder {work}", flush=True)
        t = time.perf_counter()
        report.data["throughput"] = step_throughput(cfg, device, report)
        report.data["throughput_wall_s"] = time.perf_counter() - t
        budget.left("step 2")
        t = time.perf_counter()
        data = make_train_folder(work / "imagenet", cfg)
        data["write_s"] = time.perf_counter() - t
        report.data["data"] = data
        preloaded = None
        r18 = report.data["throughput"].get("resnet18", {})
        if "images_per_s" in r18 and cfg.image_size == r18["image_size"]:
            preloaded = r18["images_per_s"]["gc_shared"]
        report.data["train"] = step_train(cfg, data, device, work, out, budget, preloaded, report)
        report.data["torchrun"] = step_torchrun(cfg, data, device, backend, work, out, budget, report)
        report.data["evaluate"] = step_evaluate(cfg, data, report.data["train"]["checkpoint"], device,
                                                work, budget, report)
    except StepFailed as e:
        failed = str(e)
    except Exception as e:  # a bug in a step: name it, keep what ran
        import traceback

        traceback.print_exc()
        failed = f"unexpected {type(e).__name__}: {e}"
    finally:
        if not args.keep_work and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    info["wall_s"] = time.monotonic() - budget.start
    checks_failed = [r["what"] for r in report.rows if r["kind"] == "check" and not r["ok"]]
    targets_failed = [r["what"] for r in report.rows if r["kind"] == "target" and not r["ok"]]
    if failed is None and checks_failed:
        failed = "checks that did not hold: " + "; ".join(checks_failed)
    result = {**info, **report.data, "rows": report.rows, "targets_failed": targets_failed,
              "failed": failed}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    block = markdown(info, report.rows, failed)
    (out / "gpu_check.md").write_text(block)
    print(block)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    if failed:
        print(f"gpu_check FAILED: {failed}", file=sys.stderr)
        return 1
    print(f"gpu_check: every step ran; {len(targets_failed)} performance target(s) missed"
          + (f": {'; '.join(targets_failed)}" if targets_failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
