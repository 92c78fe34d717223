"""recipes/quickstart.py (the README's main command) and the library pieces it uses (SmallResNet, report, viz).

The recipe runs ``--fast`` in-process through ``main(argv)``: every file, key and value range is
checked; bad arguments must fail before any training; an interrupted run must leave its
finished variants on disk.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.resnet import ResNet

from captum_consistency import to_global_max_pool
from captum_consistency.engine.transfer import TRANSFER_METHODS
from captum_consistency.models import SmallResNet
from captum_consistency.report import summarize_seeds, table1_markdown
from captum_consistency.viz import gradcam_panel, lambda_sweep_plot, panel_size
from tests._recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
quickstart = load_recipe("quickstart")

KEYS = ("top1", "pg", "spg_mean", "spg_std", "ch", "nqh", "zero_maps", "zero_maps_composite")
CUE_KEYS = ("top1_consistent", "top1_conflicting", "cue_mass", "follows_cue")


def _check_entry(entry, num_seeds, cue):
    assert entry["num_seeds"] == num_seeds and len(entry["per_seed"]) == num_seeds
    for key in KEYS + (CUE_KEYS if cue else ()):
        value = entry[key]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)
        assert entry["spread"][key] == 0.0  # one seed: no spread
    if cue:
        assert -1.0 <= entry["cue_gap"] <= 1.0
        assert math.isclose(entry["cue_gap"], entry["top1_consistent"] - entry["top1_conflicting"],
                            abs_tol=1e-9)
    else:
        assert not any(key in entry for key in CUE_KEYS + ("cue_gap",))
    assert set(entry["fgsm"]) == {"0", "1"}
    assert all(0.0 <= v <= 1.0 for v in entry["fgsm"].values())
    # epsilon 0 is the clean accuracy, measured by a different code path
    assert math.isclose(entry["fgsm"]["0"], entry["top1"], abs_tol=1e-9)
    run = entry["per_seed"][0]
    assert run["seed"] == 0 and run["train_time_s"] > 0
    assert math.isfinite(run["train_last_epoch"]["loss"])


AUDIT_FRACTIONS = ("ablation_share", "ablation_share_blur", "own_cell_probability",
                   "own_cell_predicted", "intact_probability")


def _check_audit(results, report):
    """"Did the model change, or only its map?": every variant and seed audited, every value a
    finite number in range or None with its skip counted, the reading per pair in the report."""
    for v, entry in results["variants"].items():
        for run in entry["per_seed"]:
            audit = run["audit"]
            assert audit["num_composites"] == results["config"]["audit_images"] == 48
            assert audit["num_faithfulness_images"] == 48 and audit["num_road_images"] == 6
            assert 0 <= audit["ablation_undefined"] <= audit["num_composites"]
            for key in AUDIT_FRACTIONS:
                value = audit[key]
                if value is None:  # only where every composite was undefined
                    assert key.startswith("ablation") and audit["ablation_undefined"] == 48
                else:
                    assert 0.0 <= value <= 1.0, (v, key, value)
            for key in ("deletion_gradcam", "deletion_random", "road_gradcam", "road_random"):
                assert math.isfinite(audit[key]) and -1.0 <= audit[key] <= 1.0, (v, key)
            assert list(audit["randomization"]) == ["fc", "layer4", "layer3", "layer2", "layer1",
                                                    "bn1", "conv1"]
            for block, corr in audit["randomization"].items():
                assert corr is None or -1.0 <= corr <= 1.0, (v, block)
        # the summary's audit is the mean over seeds (one seed here)
        assert entry["audit"]["ablation_share"] == entry["per_seed"][0]["audit"]["ablation_share"]
    pair, *others = results["audit"]
    assert pair["pair"] == ["gc", "baseline"]
    assert [p["pair"] for p in others] == ([["gc_finetune", "baseline"]]
                                           if "gc_finetune" in results["variants"] else [])
    if pair["comparable"]:
        base, gc = (results["variants"][v]["audit"]["ablation_share"] for v in ("baseline", "gc"))
        assert math.isclose(pair["share_relative_drop"], (base - gc) / base)
        assert pair["reading"] in ("model", "partly", "map only", "no claim")
    section = report.split("## Did the model change, or only its map?")[1].split("\n## ")[0]
    assert "| Baseline |" in section and "| GC |" in section and "GC vs Baseline" in section
    assert "Ablation share (%)" in section and "`layer4`" in section


def _check_gc_trained(results):
    """The GC variants were trained with the consistency term, the others without."""
    for v, entry in results["variants"].items():
        last = entry["per_seed"][0]["train_last_epoch"]
        assert ("consistency" in last) == quickstart.VARIANTS[v][2]
        if "consistency" in last:
            assert 0.0 <= last["consistency"] <= 2.0  # L1 of two sum-1 maps, averaged


def _check_transfer_table(results, report):
    """--transfer fast (the default): every variant scored under the fast methods of both
    libraries, the comparison computed from those rows, and the table in the report."""
    methods = list(TRANSFER_METHODS["fast"])
    assert sum(m.startswith("captum:") for m in methods) >= 4
    assert sum(m.startswith("pgc:") for m in methods) >= 4 and len(methods) >= 8
    for v, entry in results["variants"].items():
        if v == "gc_finetune":  # the table compares the paper's variants only
            assert "transfer" not in entry
            continue
        assert list(entry["transfer"]) == methods
        for method, row in entry["transfer"].items():
            assert "error" not in row, (method, row)
            for key in ("pg", "spg_mean", "ch", "nqh"):
                assert 0.0 <= row[key] <= 1.0, (method, key, row[key])
        # the per-seed rows are what the means summarise
        seed0 = entry["per_seed"][0]["transfer"]
        assert seed0["pgc:gradcam++"]["nqh"] == entry["transfer"]["pgc:gradcam++"]["nqh"]
    base, gc = (results["variants"][v]["transfer"] for v in ("baseline", "gc"))
    rows = {c["method"]: c for c in results["transfer"]}
    assert list(rows) == methods and all(c["pair"] == ["gc", "baseline"] for c in rows.values())
    for m, c in rows.items():
        drop = (base[m]["nqh"] - gc[m]["nqh"]) / base[m]["nqh"]
        assert math.isclose(c["nqh_relative_drop"], drop)
        assert c["nqh_30pct_lower"] == (drop >= 0.30)
        assert math.isclose(c["ch_change"], gc[m]["ch"] - base[m]["ch"])
    section = report.split("## Transfer to other explanation methods")[1].split("\n## ")[0]
    assert "| Method | Library | Baseline: PG / CH / NQH | GC: PG / CH / NQH |" in section
    for m in methods:
        r = base[m]
        assert (f"| `{m}` | " in section and
                f"{100 * r['pg']:.1f} / {100 * r['ch']:.1f} / {100 * r['nqh']:.1f}" in section), m
    assert "NQH at least 30% lower" in section


def test_fast_end_to_end_default_benchmark(tmp_path):
    out = tmp_path / "qs"
    done = []
    rc = quickstart.main(["--output-dir", str(out), "--fast", "--no-progress", "--workers", "1"],
                         on_run_done=lambda v, s: done.append((v, s)))
    assert rc == 0
    # the default: Baseline and GC, then the sweep points their seed-0 runs do not give, then
    # the fine-tuning of the baseline, queued when the baseline had finished
    assert done == [("baseline", 0), ("gc", 0), ("sweep:0.25", 0), ("sweep:4", 0), ("gc_finetune", 0)]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and results["benchmark"] == "shapes"
    assert list(results["variants"]) == ["baseline", "gc", "gc_finetune"]
    for entry in results["variants"].values():
        _check_entry(entry, num_seeds=1, cue=False)
    _check_gc_trained(results)
    config = results["config"]
    assert config["fast"] is True and config["seeds"] == 1 and config["cue_prob"] == 0.0

    sweep = results["lambda_sweep"]
    assert [p["lam"] for p in sweep] == [0.0, 2.0, 8.0, 32.0]
    base, gc = results["variants"]["baseline"], results["variants"]["gc"]
    # lambda 0 and lambda = --lam are the seed-0 runs of Baseline and GC, not retrained
    assert sweep[0]["nqh"] == base["per_seed"][0]["nqh"] and sweep[2]["nqh"] == gc["per_seed"][0]["nqh"]
    assert sweep[1]["source"] == sweep[3]["source"] == "GC, lambda sweep"

    claim, tuned_claim = results["claims"]
    assert tuned_claim["pair"] == ["gc_finetune", "baseline"] and tuned_claim["comparable"]
    assert claim["pair"] == ["gc", "baseline"] and claim["comparable"]
    drop = (base["nqh"] - gc["nqh"]) / base["nqh"]
    assert math.isclose(claim["nqh_relative_drop"], drop)
    assert claim["checks"]["nqh_30pct_lower"] == (drop >= 0.30)
    assert claim["checks"]["ch_not_lower"] == (gc["ch"] >= base["ch"])
    assert claim["checks"]["top1_within_3_points"] == (gc["top1"] >= base["top1"] - 0.03)
    assert results["machine"]["workers"] == 1 and results["elapsed_s"] > 0

    _check_transfer_table(results, (out / "report.md").read_text())
    _check_audit(results, (out / "report.md").read_text())

    report = (out / "report.md").read_text()
    # the transfer paragraph against the paper's Tables 3-4, metric by metric
    assert "| `cmwp` (Table 3) | NQH (%) | 74.89 -> 74.90" in report
    assert "| `fullgrad` (Table 4) | PG | 59.90 -> 64.90" in report
    assert "## Did the models learn the object?" in report
    assert "| Model | Top-1 Acc (%) | PG | SPG | SPG run std | CH (%) | NQH (%) | Zero maps (%) |" in report
    assert "cue-conflicting" not in report.split("## Lambda sweep")[0]  # no cue on this benchmark
    for name in ("Baseline", "GC"):
        assert f"| ResNet {name} |" in report
    assert "gradcam.png" in report and "lambda_sweep.png" in report and "claim" in report
    # a 1-epoch model has not learned the object, and the report says so before the claims
    assert "not learned" in report.split("## Table 1")[0]

    with Image.open(out / "gradcam.png") as img:
        img.load()
        assert img.format == "PNG" and img.mode == "RGB"
        # 2 composites (rows) x (input + 3 variants), tiles of 2 x 64 px
        assert img.size == panel_size(2, 3, 2 * 64)
        assert np.asarray(img).std() > 10  # not a blank canvas
    with Image.open(out / "lambda_sweep.png") as img:
        img.load()
        assert img.format == "PNG" and np.asarray(img.convert("L")).std() > 10


def test_fast_end_to_end_spurious_cue_benchmark(tmp_path):
    out = tmp_path / "qs"
    done = []
    rc = quickstart.main(["--output-dir", str(out), "--fast", "--no-progress",
                          "--benchmark", "spurious-cue", "--workers", "1"],
                         on_run_done=lambda v, s: done.append((v, s)))
    assert rc == 0
    assert done == [("baseline", 0), ("gc", 0), ("gmp", 0), ("gmp_gc", 0)]  # no sweep
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and results["benchmark"] == "spurious-cue"
    assert list(results["variants"]) == ["baseline", "gc", "gmp", "gmp_gc"]
    for entry in results["variants"].values():
        _check_entry(entry, num_seeds=1, cue=True)
    _check_gc_trained(results)
    assert results["config"]["cue_strength"] == 0.9 and results["config"]["cue_prob"] == 1.0
    assert results["lambda_sweep"] == []
    assert [c["pair"] for c in results["claims"]] == [["gc", "baseline"], ["gmp_gc", "gmp"]]

    report = (out / "report.md").read_text()
    assert "| Top-1 cue-conflicting (%) |" in report and "What GC can act on" in report
    # DeepLift's rescale rule does not cover the global max pool of the GMP models: the
    # warning is reported next to the transfer table, the row is still there
    gmp_seed0 = results["variants"]["gmp"]["per_seed"][0]
    assert any(w.startswith("captum:deeplift:") and "adaptive_max_pool2d" in w
               for w in gmp_seed0["transfer_warnings"])
    assert results["variants"]["baseline"]["per_seed"][0]["transfer_warnings"] == []
    assert "What the methods said about these models:" in report and "- GMP: captum:deeplift:" in report
    for name in ("Baseline", "GC", "GMP", "GMP + GC"):
        assert f"| ResNet {name} |" in report
    assert not (out / "lambda_sweep.png").exists()
    with Image.open(out / "gradcam.png") as img:
        img.load()
        # 2 images (rows) x (input + 4 variants), tiles of 4 x 32 px
        assert img.size == panel_size(2, 4, 4 * 32)


def test_worker_processes_give_the_same_numbers_as_one_process(tmp_path):
    """--workers 2 (spawned processes, jobs finishing in any order) reports exactly what the
    sequential in-process run reports, run by run."""
    common = ["--fast", "--no-progress", "--threads", "1", "--variants", "baseline,gc", "--transfer", "none",
              "--lambda-sweep", "0,1,4"]
    rc = quickstart.main(["--output-dir", str(tmp_path / "one"), "--workers", "1", *common])
    assert rc == 0
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "quickstart.py"), "--output-dir",
         str(tmp_path / "two"), "--workers", "2", *common],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaked" not in proc.stderr
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["status"] == "complete" and two["config"]["workers"] == 2
    for v in ("baseline", "gc"):
        a, b = one["variants"][v]["per_seed"][0], two["variants"][v]["per_seed"][0]
        for key in ("top1", "pg", "spg_mean", "ch", "nqh", "zero_maps", "fgsm", "audit"):
            assert a[key] == b[key], (v, key)
    assert [p["nqh"] for p in one["lambda_sweep"]] == [p["nqh"] for p in two["lambda_sweep"]]
    with Image.open(tmp_path / "one" / "gradcam.png") as a, Image.open(tmp_path / "two" / "gradcam.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # columns in --variants order


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupting_worker_processes_keeps_finished_runs(tmp_path, signame):
    import os
    import signal
    import time

    out = tmp_path / "qs"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "recipes" / "quickstart.py"), "--output-dir", str(out),
         "--no-progress", "--workers", "2", "--seeds", "10", "--lambda-sweep", "none",
         "--train-size", "96", "--test-size", "48", "--batch-size", "32", "--epochs", "1",
         "--width", "8", "--figure-images", "2", "--fgsm-eps", "0", "--transfer", "none"],  # 20 short runs
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # pytest-xdist workers ignore SIGINT, and an ignored signal stays ignored across exec:
        # give the recipe the disposition a terminal gives it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # wait for the first finished run
            try:
                if json.loads((out / "results.json").read_text())["variants"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        if signame == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        else:
            proc.send_signal(signal.SIGTERM)  # `kill PID`: the parent alone
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted"
    finished = sum(e["num_seeds"] for e in results["variants"].values())
    assert 1 <= finished < 20
    # no worker outlives the run (multiprocessing's resource tracker exits once it sees the
    # parent's pipe close: give it a moment)
    for _ in range(50):
        alive = subprocess.run(["pgrep", "-a", "-g", str(proc.pid)], capture_output=True,
                               text=True).stdout.strip()
        if not alive:
            break
        time.sleep(0.2)
    assert alive == ""


def test_all_zero_maps_get_a_row_not_a_crash(tmp_path, monkeypatch):
    """A variant whose Grad-CAM maps are all zero is reported with its zero share and n/a
    metrics: no crash, and no NaN written as a number."""
    train = quickstart.train_model

    def train_then_zero_layer4(args, variant, *a, **k):
        trained = train(args, variant, *a, **k)
        if variant == "gc":  # layer4's output is relu(0 + 0) = 0: every map is zero
            for m in trained["model"].layer4.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    torch.nn.init.zeros_(m.weight)
                    torch.nn.init.zeros_(m.bias)
        return trained

    monkeypatch.setattr(quickstart, "train_model", train_then_zero_layer4)
    out = tmp_path / "qs"
    rc = quickstart.main(["--output-dir", str(out), "--fast", "--no-progress",
                          "--lambda-sweep", "none", "--workers", "1"])
    assert rc == 0
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    gc = json.loads(text)["variants"]["gc"]
    assert gc["zero_maps"] == 1.0 and gc["zero_maps_composite"] == 1.0
    assert gc["pg"] is None and gc["ch"] is None and gc["nqh"] is None
    assert json.loads(text)["claims"][0] == {"pair": ["gc", "baseline"], "comparable": False}
    # the transfer methods get the same all-zero maps: skipped, never averaged in as numbers
    for method, row in gc["transfer"].items():
        assert "error" not in row and row["nqh"] is None and row["ch"] is None, (method, row)
    comparison = {c["method"]: c for c in json.loads(text)["transfer"]}
    assert comparison["captum:saliency"]["comparable"] is False
    # a constant logit: every composite's ablation share undefined, counted, never a NaN
    audit = gc["per_seed"][0]["audit"]
    assert audit["ablation_share"] is None and audit["ablation_undefined"] == audit["num_composites"]
    assert json.loads(text)["audit"][0] == {"pair": ["gc", "baseline"], "comparable": False}
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| ResNet GC |"))
    assert "n/a" in row and "| 100.0 ± 0.0 | 1 |" in row  # zero maps 100%, one seed
    assert "not comparable" in report


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--classes", "1"], "--classes"),
        (["--classes", "11"], "--classes"),
        (["--image-size", "16"], "--image-size"),  # layer4 would be 2x2 but the data needs 32
        (["--image-size", "36"], "--image-size"),  # not a multiple of the stride 8
        (["--cue-strength", "1.5"], "--cue-strength"),
        (["--cue-prob", "-0.1"], "--cue-prob"),
        (["--object-size", "0.3", "0.2"], "--object-size"),
        (["--benchmark", "spurious-cue", "--object-size", "0.2", "0.3"], "--object-size"),
        (["--lambda-sweep", "1,-2"], "--lambda-sweep"),
        (["--benchmark", "imagenet"], "--benchmark"),
        (["--variants", "baseline,nope"], "--variants"),
        (["--fgsm-eps", "-1"], "--fgsm-eps"),
        (["--transfer", "captum:saliency"], "--transfer"),  # a list name, not a method
        (["--transfer-images", "0"], "--transfer-images"),
        (["--audit-images", "-1"], "--audit-images"),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path, monkeypatch, capsys, argv, message):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(quickstart, "train_model", no_training)
    monkeypatch.setattr(quickstart, "_render", no_training)
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--output-dir", str(tmp_path / "bad"), "--fast", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_bad_arguments_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "quickstart.py"), "--classes", "1",
         "--output-dir", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--classes must be between 2 and 10" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_interrupt_keeps_finished_variants(tmp_path, capsys):
    out = tmp_path / "qs"

    def interrupt(variant, seed):  # Ctrl-C right after the first variant is written
        raise KeyboardInterrupt

    rc = quickstart.main(["--output-dir", str(out), "--fast", "--no-progress",
                          "--variants", "baseline,gc", "--workers", "1", "--transfer", "none"],
                         on_run_done=interrupt)
    assert rc == 130
    assert "interrupted" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert list(results["variants"]) == ["baseline"]
    _check_entry(results["variants"]["baseline"], num_seeds=1, cue=False)
    report = (out / "report.md").read_text()
    assert "interrupted" in report and "| ResNet Baseline |" in report
    assert [p["lam"] for p in results["lambda_sweep"]] == [0.0]  # the baseline's point only
    assert "| ResNet GC |" not in report


# ------------------------------------------------------------------------ library pieces


def test_small_resnet_is_a_torchvision_resnet_with_stride_8():
    torch.manual_seed(0)
    model = SmallResNet(num_classes=3)
    assert isinstance(model, ResNet)
    x = torch.rand(2, 3, 32, 32)
    feats = {}
    model.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    assert model(x).shape == (2, 3)
    assert feats["a"].shape == (2, 128, 4, 4)  # 32 / 8
    # its forward is torchvision's: same output as ResNet.forward's stages by hand
    with torch.no_grad():
        model.eval()
        h = model.relu(model.bn1(model.conv1(x)))
        h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
        ref = model.fc(torch.flatten(model.avgpool(h), 1))
        torch.testing.assert_close(model(x), ref)
    to_global_max_pool(model)
    with torch.no_grad():
        h = model.layer4(model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x)))))))
        torch.testing.assert_close(model(x), model.fc(h.amax(dim=(2, 3))))
    with pytest.raises(ValueError, match="num_classes"):
        SmallResNet(num_classes=1)
    with pytest.raises(ValueError, match="widths"):
        SmallResNet(num_classes=2, widths=(8, 16, 32))


def test_summarize_seeds_hand_computed():
    s = summarize_seeds([
        {"seed": 0, "top1": 0.5, "nqh": None, "fgsm": {"1": 0.2}, "name": "x"},
        {"seed": 1, "top1": 0.7, "nqh": 0.4, "fgsm": {"1": 0.4}, "name": "x"},
        {"seed": 2, "top1": 0.9, "nqh": 0.2, "fgsm": {"1": 0.6}, "name": "x"},
    ])
    assert math.isclose(s["top1"], 0.7) and math.isclose(s["spread"]["top1"], 0.2)  # ddof 1
    assert math.isclose(s["nqh"], 0.3) and math.isclose(s["spread"]["nqh"], math.sqrt(0.02))
    assert math.isclose(s["fgsm"]["1"], 0.4) and math.isclose(s["spread"]["fgsm"]["1"], 0.2)
    assert "name" not in s and s["num_seeds"] == 3 and len(s["per_seed"]) == 3


def test_table1_markdown_rows():
    s = summarize_seeds([{"top1": 0.5, "pg": 0.6, "spg_mean": 0.3, "spg_std": 0.01, "ch": 0.4,
                          "nqh": 0.25}, {"top1": 0.7, "pg": 0.6, "spg_mean": 0.3,
                                         "spg_std": 0.01, "ch": 0.4, "nqh": 0.25}])
    table = table1_markdown({"Baseline": s})
    lines = table.strip().splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert lines[2].startswith("| ResNet Baseline | 60.0 ± 14.1 | 60.0 ± 0.0 | 30.0 ± 0.0 | 1.00 |")
    assert "n/a" in lines[2]  # cue columns absent
    no_cue = table1_markdown({"Baseline": s}, cue=False).strip().splitlines()
    assert no_cue[0] == ("| Model | Top-1 Acc (%) | PG | SPG | SPG run std | CH (%) | NQH (%) | "
                         "Zero maps (%) | Seeds |")
    assert no_cue[2] == "| ResNet Baseline | 60.0 ± 14.1 | 60.0 ± 0.0 | 30.0 ± 0.0 | 1.00 | 40.0 ± 0.0 | 25.0 ± 0.0 | n/a | 2 |"


def test_lambda_sweep_plot_writes_a_png_with_gaps_for_missing_values(tmp_path):
    points = [{"lam": 0.0, "nqh": 0.45, "ch": 0.2, "top1": 0.95},
              {"lam": 8.0, "nqh": 0.25, "ch": 0.3, "top1": 0.96},
              {"lam": 2.0, "nqh": None, "ch": None, "top1": 0.9}]  # unsorted, one gap
    path = lambda_sweep_plot(points, str(tmp_path / "sweep.png"), title="t")
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and np.asarray(img.convert("L")).std() > 10


def test_gradcam_panel_layout_and_overlay():
    images = np.full((3, 16, 16, 3), 0.5, dtype=np.float32)
    maps = torch.zeros(3, 1, 2, 2)
    maps[:, 0, 0, 0] = 1.0  # all the mass in the top-left quarter
    panel = gradcam_panel(images, {"A": maps, "B": maps * 2}, titles=["a", "b", "c"], tile=32,
                          header=10, pad=2)
    assert panel.size == panel_size(3, 2, 32, header=10, pad=2) == (2 + 3 * 34, 10 + 2 + 3 * 34)
    arr = np.asarray(panel).astype(np.float64)
    tile_a = arr[12:44, 36:68]  # first row, column "A"
    # the JET colormap: red (hot) top-left, blue (cold) bottom-right
    assert tile_a[2, 2, 0] > tile_a[2, 2, 2] and tile_a[-3, -3, 2] > tile_a[-3, -3, 0]
    np.testing.assert_array_equal(arr[12:44, 36:68], arr[12:44, 70:102])  # scale-free
    with pytest.raises(ValueError, match="maps"):
        gradcam_panel(images, {"A": maps[:2]}, tile=32)
