"""benchmarks/gpu_check.py, the prepared GPU check of issue 25, end to end on the CPU (--tiny).

The script's four steps run as on the GPU (throughput ratios of ResNet-18 and ResNet-50,
``recipes/train.py --composites shared --amp`` on a written ImageNet-format folder, the same
under ``torchrun`` with a corrupt JPEG, ``recipes/evaluate.py`` at batch B and 1), with tiny
sizes, the gloo backend and real subprocesses; the test checks what it wrote.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests._recipes import ROOT, subprocess_env

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny_on_the_cpu_runs_every_step_and_counts_the_skipped_step(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--backend", "gloo", "--tiny",
                          "--out", str(out), "--time-budget", "600"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["failed"] is None and report["device"] == "cpu" and report["backend"] == "gloo"
    for key in ("date", "torch", "torchvision", "device_name", "throughput", "data", "train", "torchrun",
                "evaluate", "rows", "targets_failed"):
        assert key in report, key
    # Step 1: both models, both ratios, each with its PASS/FAIL line.
    assert set(report["throughput"]) == {"resnet18", "resnet50"}
    for r in report["throughput"].values():
        assert r["gc_over_ce224_plus_ce448"] > 0 and r["gc_shared_over_ce224"] > 0
    targets = [r for r in report["rows"] if r["kind"] == "target"]
    assert len(targets) == 4 and all(r["ok"] in (True, False) for r in targets)
    assert "PASS" in res.stdout or "FAIL" in res.stdout
    # Step 2: 4 steps of 4 images in two epochs, a rate and a bottleneck verdict.
    train = report["train"]
    assert train["steps"] == 4 and train["batch_size"] == 4
    assert train["images_per_s_steady_epoch2"] > 0 and train["bottleneck"] in ("CPU", "data loading")
    # Step 3: the corrupt JPEG counted in each epoch; at batch size 1 its empty step is skipped.
    torchrun = report["torchrun"]
    assert [e["skipped"] for e in torchrun["per_epoch"]] == [1, 1]
    assert [e["samples"] for e in torchrun["per_epoch"]] == [7, 7]
    assert torchrun["batch1"] == {"skipped": 1, "skipped_steps": 1, "steps": 7, "samples": 7}
    assert torchrun["process_group_with_one_process"] is False
    assert torchrun["vote_probe"]["ok"] and torchrun["vote_probe"]["backend"] == "gloo"
    # Step 4: evaluation rates at batch 4 and 1, the same PG and CH.
    evaluation = report["evaluate"]
    assert set(evaluation["images_per_s"]) == {"batch_4", "batch_1"} and evaluation["same_pg_ch"]
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("### CPU: `python benchmarks/gpu_check.py`") and "tiny sizes" in markdown
    assert report["torch"] in markdown and "| 3 | torchrun, batch 1" in markdown
    for log in ("train.log", "torchrun_corrupt.log", "torchrun_batch1.log"):
        assert (out / log).is_file()


def _load_script():
    spec = importlib.util.spec_from_file_location("_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_refuses_a_mismatched_backend_and_a_missing_gpu_before_any_work(tmp_path):
    gpu_check = _load_script()
    with pytest.raises(SystemExit, match="--backend nccl with --device cpu: .* uses gloo on cpu"):
        gpu_check.main(["--device", "cpu", "--backend", "nccl", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--steps must be an even number"):
        gpu_check.main(["--device", "cpu", "--tiny", "--steps", "3", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device is available"):
            gpu_check.main(["--tiny", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing written: it stopped before any step


def test_gpu_check_past_its_time_budget_fails_naming_the_step_and_keeps_what_ran(tmp_path, capsys,
                                                                               one_thread):
    gpu_check = _load_script()
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--archs", "resnet18", "--time-budget", "0.01",
                         "--out", str(tmp_path)])
    assert rc == 1
    assert "gpu_check FAILED: step 2: the time budget of 0 s ran out" in capsys.readouterr().err
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"].startswith("step 2: the time budget")
    assert set(report["throughput"]) == {"resnet18"} and "train" not in report  # step 1 ran, 2 did not
    assert "**Failed**: step 2" in (tmp_path / "gpu_check.md").read_text()
