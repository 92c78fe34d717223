"""End to end: recipes/train.py -> kill -> resume -> evaluate.py -> robustness.py, on the CPU.

On tiny data sets written in the real on-disk formats (ImageFolder JPEGs with VOC XML boxes,
COCO JSON with polygon and RLE masks) and on the synthetic generator. The recipes run
in-process through their ``main(args)`` (as torchvision's references allow), except the run
that is killed with SIGKILL and the torchrun run, which are real subprocesses.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._fixtures_data import corrupt_file, make_coco_folder, make_imagenet_folder

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SIZE = "64"  # --image-size: composites are 128 x 128


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load("train")
evaluate = _load("evaluate")
robustness = _load("robustness")


def _run(module, argv):
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture
def one_thread():
    # Bit-reproducible CPU kernels between this process and the subprocesses (1 thread each).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), num_classes=3, images_per_class=4)


def _inet_train_args(fx, out, epochs, *extra):
    return ["--data", "imagenet", "--data-root", fx.root, "--arch", "resnet18", "--image-size", SIZE,
            "--epochs", epochs, "--batch-size", "4", "--lr", "0.01", "--device", "cpu",
            "--workers", "0", "--output-dir", out, "--seed", "3", "--no-progress", *extra]


def test_help_of_every_recipe():
    for module in (train, evaluate, robustness):
        text = module.get_args_parser().format_help()
        assert "--output-dir" in text and "--device" in text
    assert "--gc-lambda" in train.get_args_parser().format_help()
    assert "--method" in evaluate.get_args_parser().format_help()
    out = subprocess.run([sys.executable, str(RECIPES / "train.py"), "--help"], capture_output=True,
                         text=True, env=_env(), timeout=120)
    assert out.returncode == 0 and "--distractors" in out.stdout


def test_imagenet_train_kill_resume_evaluate_robustness(imagenet, tmp_path, one_thread):
    fx = imagenet
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    ckpt = killed / "checkpoint.pth"

    # 1. A real process, SIGKILLed while it trains its second epoch.
    proc = subprocess.Popen([sys.executable, str(RECIPES / "train.py"),
                             *map(str, _inet_train_args(fx, killed, 4))], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0].decode()
    assert ckpt.exists(), output
    first = torch.load(ckpt, weights_only=True)
    assert 1 <= first["epoch"] < 4, "the run ended before it could be killed"

    # Without --resume the recipe refuses to overwrite the checkpoint.
    with pytest.raises(FileExistsError, match="--resume"):
        _run(train, _inet_train_args(fx, killed, 4))
    # A checkpoint of another architecture: a clear error naming the file.
    with pytest.raises(ValueError, match=r"checkpoint\.pth.*'resnet18'.*'resnet50'"):
        _run(train, _inet_train_args(fx, tmp_path / "other", 4, "--arch", "resnet50",
                                     "--resume", ckpt))

    # 2. Resume to the end, and an uninterrupted run with the same seed: identical weights.
    record = _run(train, _inet_train_args(fx, killed, 4, "--resume", ckpt))
    assert record["epoch"] == 4
    _run(train, _inet_train_args(fx, reference, 4))
    resumed = torch.load(ckpt, weights_only=True)
    straight = torch.load(reference / "checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 4
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, msg=key)
    assert resumed["scheduler"]["last_epoch"] == 4
    epochs = [json.loads(line)["epoch"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert epochs[-1] == 4 and epochs == sorted(set(epochs))  # one line per completed epoch
    assert not [p for p in os.listdir(killed) if p.startswith(".tmp-")]
    events = list((killed / "tensorboard").iterdir())
    assert events, "no TensorBoard event file"

    # 3. Evaluate: every key of the issue, consistent values, a Table 1 row.
    metrics = _run(evaluate, ["--checkpoint", ckpt, "--boxes", fx.boxes_dirs["val"], "--device", "cpu",
                              "--workers", "0", "--batch-size", "4", "--output-dir", tmp_path / "eval",
                              "--no-progress"])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("top1", "pg", "spg_mean", "spg_std", "ch", "nqh", "skipped"):
        assert key in saved, key
    assert saved["num_images"] == 12 and saved["classified_images"] == 12
    for key in ("top1", "pg", "spg_mean", "ch", "nqh"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved["num_composites"] + saved["skipped_detail"]["degenerate_composites"] == 12
    assert saved == json.loads(json.dumps(metrics))
    table = (tmp_path / "eval" / "table.md").read_text().splitlines()
    assert table[0] == "| Model | Top-1 Acc (%) | PG | SPG | CH (%) | NQH (%) |"
    assert table[2].startswith("| ResNet18 GC (elementwise-gradcam) | ")
    assert f"{100 * saved['pg']:.2f}" in table[2] and "±" in table[2]
    # Batch norm was folded into the convolutions (the default); unfolded, the numbers agree.
    unfolded = _run(evaluate, ["--checkpoint", ckpt, "--boxes", fx.boxes_dirs["val"], "--device", "cpu",
                               "--workers", "0", "--batch-size", "4", "--output-dir", tmp_path / "eval-bn",
                               "--no-progress", "--no-fold-bn", "--no-nqh"])
    for key in ("top1", "pg", "spg_mean", "spg_std", "num_images"):
        assert unfolded[key] == metrics[key], key
    assert unfolded["ch"] == pytest.approx(metrics["ch"], abs=1e-6)

    # 4. Robustness (Table 6): accuracy under FGSM for the paper's epsilons.
    rob = _run(robustness, ["--checkpoint", ckpt, "--device", "cpu", "--workers", "0",
                            "--output-dir", tmp_path / "fgsm", "--no-progress"])
    saved = json.loads((tmp_path / "fgsm" / "robustness.json").read_text())
    assert list(saved["accuracy"]) == ["1", "2", "8", "16", "32", "64"]
    assert saved["clean_top1"] == pytest.approx(metrics["top1"])  # same crops, same model
    assert all(0.0 <= v <= 1.0 for v in saved["accuracy"].values()) and saved["images"] == 12
    assert rob["accuracy"] == saved["accuracy"]
    md = (tmp_path / "fgsm" / "robustness.md").read_text()
    assert "ε = 64" in md and "ResNet18 GC" in md


def test_imagenet_evaluation_skips_or_names_bad_files(imagenet, tmp_path, one_thread):
    import shutil

    fx = imagenet
    root = tmp_path / "copy"
    shutil.copytree(fx.root, root)
    out = tmp_path / "run"
    _run(train, _inet_train_args(fx, out, 1, "--gc-lambda", "0", "--gmp", "--no-val"))
    ckpt = out / "checkpoint.pth"
    assert torch.load(ckpt, weights_only=True)["gmp"] is True
    boxes = root / "boxes" / "val"
    xml = sorted(boxes.iterdir())[0]
    xml.unlink()
    jpeg = Path(sorted(p for p in (root / "val").rglob("*.JPEG") if p.stem != xml.stem)[0])
    corrupt_file(jpeg)
    args = ["--checkpoint", ckpt, "--data-root", root, "--boxes", boxes, "--device", "cpu",
            "--workers", "0", "--batch-size", "4", "--no-progress", "--output-dir", tmp_path / "e"]
    with pytest.raises(FileNotFoundError, match=xml.stem):
        _run(evaluate, args)
    with pytest.raises(OSError, match=jpeg.name):
        _run(evaluate, args + ["--skip-missing-boxes"])
    metrics = _run(evaluate, args + ["--skip-missing-boxes", "--skip-corrupt", "--method", "gradcam"])
    detail = metrics["skipped_detail"]
    assert detail["images_dropped_by_dataset"] == 1  # the image without its XML
    assert detail["images_dropped_in_loading"] == 2  # the corrupt JPEG, in both passes
    assert metrics["num_images"] + detail["degenerate_maps_or_masks"] == 10  # 12 - 2
    assert metrics["classified_images"] == 11  # crops need no XML: only the corrupt one is lost
    assert metrics["skipped"] == sum(detail.values())
    row = (tmp_path / "e" / "table.md").read_text().splitlines()[2]
    assert row.startswith("| ResNet18 GMP (gradcam) |")


def test_coco_train_evaluate_with_dataset_distractors(tmp_path, one_thread):
    root = tmp_path / "coco"
    make_coco_folder(root, split="train2017", num_images=10, seed=1)
    val = make_coco_folder(root, split="val2017", num_images=6, seed=2)
    out = tmp_path / "run"
    record = _run(train, ["--data", "coco", "--data-root", root, "--train-split", "train2017",
                          "--val-split", "val2017", "--arch", "resnet18", "--image-size", SIZE,
                          "--epochs", "1", "--batch-size", "3", "--device", "cpu", "--workers", "0",
                          "--distractors", "dataset", "--output-dir", out, "--no-progress"])
    assert {"f1_per_class", "f1_overall"} <= set(record["train"]) and "consistency" in record["train"]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["classes"] == ["person", "car", "dog"] and ckpt["multilabel"] is True
    assert ckpt["args"]["gc_lambda"] is None  # the paper's COCO lambda (1) was used
    metrics = _run(evaluate, ["--checkpoint", out / "checkpoint.pth", "--split", "val2017",
                              "--device", "cpu", "--workers", "0", "--batch-size", "2",
                              "--output-dir", tmp_path / "eval", "--no-progress"])
    for key in ("f1_per_class", "f1_overall", "pg", "spg_mean", "spg_std", "ch", "nqh", "skipped"):
        assert key in metrics
    assert "top1" not in metrics
    present = int(val.targets.sum())  # (image, category) pairs of the annotated images
    assert metrics["num_images"] + metrics["skipped_detail"]["degenerate_maps_or_masks"] == present
    assert metrics["skipped_detail"]["images_dropped_by_dataset"] == len(val.empty_image_ids)
    table = (tmp_path / "eval" / "table.md").read_text().splitlines()
    assert table[0].startswith("| Model | F1-PerClass | F1-Overall | PG |")
    with pytest.raises(ValueError, match="single-label"):
        _run(robustness, ["--checkpoint", out / "checkpoint.pth", "--device", "cpu",
                          "--output-dir", tmp_path / "fgsm"])


def test_synthetic_torchrun_two_processes_then_evaluate(tmp_path):
    out = tmp_path / "ddp"
    common = ["--data", "synthetic", "--arch", "resnet18", "--image-size", SIZE, "--batch-size", "4",
              "--device", "cpu", "--workers", "0", "--synthetic-train-length", "16",
              "--synthetic-val-length", "8", "--lr", "0.01", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(RECIPES / "train.py"), *common, "--epochs", "1",
           "--output-dir", str(out)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["train"]["samples"] == 16 and record["train"]["steps"] == 2  # 2 ranks x 2 x 4
    assert record["val"]["samples"] == 8  # every validation image counted once

    metrics = _run(evaluate, ["--checkpoint", out / "checkpoint.pth", "--device", "cpu",
                              "--workers", "0", "--batch-size", "4", "--method", "gradcam",
                              "--output-dir", tmp_path / "eval", "--no-progress"])
    assert metrics["split"] == "test" and metrics["classified_images"] == 8
    assert metrics["tolerance"] == pytest.approx(15 * 64 / 224)
    assert metrics["num_images"] + metrics["skipped_detail"]["degenerate_maps_or_masks"] == 8
