"""End to end: recipes/train.py --loss X trains, resumes and evaluates, on the tiny on-disk data.

One self-supervised loss (cgc, on the shapes generator, and under torchrun with negatives
gathered across two gloo processes) and one mask-guided loss (energy, on the ImageNet-like
fixture with training boxes); the training masks follow the images' random crops.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captum_consistency.data import IMAGENET_MEAN, IMAGENET_STD, ImageNetWithBoxes, WithTrainingMasks
from tests._fixtures_data import make_imagenet_folder
from tests._recipes import load_recipe, run_recipe, subprocess_env

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
train = load_recipe("train")
evaluate = load_recipe("evaluate")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet_boxes"), num_classes=3, images_per_class=4,
                                boxes_splits=("train", "val"))


def _assert_same_weights(a, b):
    wa, wb = torch.load(a, weights_only=True)["model"], torch.load(b, weights_only=True)["model"]
    for key, value in wb.items():
        torch.testing.assert_close(wa[key], value, msg=key)


def test_training_masks_follow_the_crop_and_flip(imagenet):
    """The fixture fills each box with its class colour over grey noise: after the joint
    transform, the mask's pixels are the colour and the others the noise."""
    ds = ImageNetWithBoxes(imagenet.root, "train", boxes_dir=imagenet.boxes_dirs["train"], transform=None,
                           on_missing_boxes="empty")
    wrapped = WithTrainingMasks(ds, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.manual_seed(0)
    checked = 0
    for i in range(len(wrapped)):
        s = wrapped[i]
        assert s.image.shape == (3, 32, 32) and s.mask.shape == (32, 32) and s.mask.dtype == torch.bool
        pixels = ((s.image * std + mean) * 255).round()
        grey = (pixels >= 85).all(0) & (pixels <= 135).all(0) & ((pixels.amax(0) - pixels.amin(0)) <= 45)
        inner = s.mask.clone()  # away from the edges, where resampling mixes the two
        inner[1:] &= s.mask[:-1]
        inner[:-1] &= s.mask[1:]
        inner[:, 1:] &= s.mask[:, :-1]
        inner[:, :-1] &= s.mask[:, 1:]
        outer = ~s.mask
        outer[1:] &= ~s.mask[:-1]
        outer[:-1] &= ~s.mask[1:]
        outer[:, 1:] &= ~s.mask[:, :-1]
        outer[:, :-1] &= ~s.mask[:, 1:]
        if inner.sum() > 4 and outer.sum() > 4:
            checked += 1
            assert float(grey[inner].float().mean()) < 0.2, i  # the class colour inside
            assert float(grey[outer].float().mean()) > 0.6, i  # the noise outside (other boxes aside)
        assert s.gradcam_target == s.target == imagenet.labels["train"][i]
    assert checked >= 4


def _inet_args(fx, out, epochs, *extra):
    return ["--data", "imagenet", "--data-root", fx.root, "--arch", "resnet18", "--image-size", "64",
            "--epochs", epochs, "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "--workers", "0",
            "--output-dir", out, "--seed", "3", "--no-progress", *extra]


def test_energy_on_imagenet_boxes_trains_resumes_and_evaluates(imagenet, tmp_path, one_thread, capsys):
    fx = imagenet
    # a mask-guided loss without masks: refused before anything runs, argparse's status 2
    with pytest.raises(SystemExit) as exc:
        run_recipe(train, _inet_args(fx, tmp_path / "refused", 1, "--loss", "energy"))
    assert exc.value.code == 2 and "--loss energy needs object masks" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    boxes = ["--loss", "energy", "--train-boxes", fx.boxes_dirs["train"]]
    run = tmp_path / "run"
    first = run_recipe(train, _inet_args(fx, run, 1, *boxes))
    # a random crop can miss the box, or lie inside it: those images are skipped and counted
    assert first["epoch"] == 1 and 0 <= first["train"]["mask_skipped"] < 12 and first["train"]["steps"] == 3
    assert 0.0 <= first["train"]["consistency"] <= 1.0
    with pytest.raises(ValueError, match="trained with --loss energy, not cgc"):
        run_recipe(train, _inet_args(fx, run, 2, "--loss", "cgc", "--resume", run / "checkpoint.pth"))
    resumed = run_recipe(train, _inet_args(fx, run, 2, *boxes, "--resume", run / "checkpoint.pth"))
    assert resumed["epoch"] == 2
    run_recipe(train, _inet_args(fx, tmp_path / "straight", 2, *boxes))
    _assert_same_weights(run / "checkpoint.pth", tmp_path / "straight" / "checkpoint.pth")

    metrics = run_recipe(evaluate, ["--checkpoint", run / "checkpoint.pth", "--boxes", fx.boxes_dirs["val"],
                                    "--device", "cpu", "--workers", "0", "--batch-size", "4",
                                    "--output-dir", tmp_path / "eval", "--no-progress"])
    assert metrics["num_images"] + metrics["skipped_detail"]["degenerate_maps_or_masks"] == 12
    assert metrics["classified_images"] == 12 and metrics["model"] == "ResNet18 ENERGY"
    for key in ("top1", "pg", "ch", "nqh"):
        assert 0.0 <= metrics[key] <= 1.0, key
    table = (tmp_path / "eval" / "table.md").read_text().splitlines()
    assert table[2].startswith("| ResNet18 ENERGY")


def _synthetic_args(out, epochs, *extra):
    return ["--data", "synthetic", "--arch", "resnet18", "--image-size", "64", "--batch-size", "4",
            "--device", "cpu", "--workers", "0", "--synthetic-train-length", "16", "--synthetic-val-length", "8",
            "--synthetic-classes", "3", "--lr", "0.01", "--no-progress", "--epochs", epochs,
            "--output-dir", out, "--seed", "1", *extra]


def test_cgc_on_synthetic_trains_resumes_and_evaluates(tmp_path, one_thread):
    run = tmp_path / "run"
    first = run_recipe(train, _synthetic_args(run, 1, "--loss", "cgc"))
    assert first["train"]["steps"] == 4 and np.isfinite(first["train"]["consistency"])
    assert first["train"]["consistency"] > 0  # InfoNCE with 3 negatives: > 0
    run_recipe(train, _synthetic_args(run, 2, "--loss", "cgc", "--resume", run / "checkpoint.pth"))
    run_recipe(train, _synthetic_args(tmp_path / "straight", 2, "--loss", "cgc"))
    _assert_same_weights(run / "checkpoint.pth", tmp_path / "straight" / "checkpoint.pth")
    metrics = run_recipe(evaluate, ["--checkpoint", run / "checkpoint.pth", "--device", "cpu", "--workers", "0",
                                    "--batch-size", "4", "--output-dir", tmp_path / "eval", "--no-progress"])
    assert metrics["classified_images"] == 8
    assert (tmp_path / "eval" / "table.md").read_text().splitlines()[2].startswith("| ResNet18 CGC")


def test_cgc_under_torchrun_two_gloo_processes_with_gathered_negatives_and_bf16(tmp_path):
    """CGC with its negatives gathered across the two processes (all_gather with gradient),
    under DistributedDataParallel with bf16 autocast; the first-step graph check runs too."""
    out = tmp_path / "cgc"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(RECIPES / "train.py"),
           *map(str, _synthetic_args(out, 1, "--loss", "cgc", "--cgc-gather-negatives", "--amp"))]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["train"]["samples"] == 16 and record["train"]["steps"] == 2
    # 7 negatives (3 local + 4 of the other rank): the term starts near log(8), not log(4)
    assert np.isfinite(record["train"]["consistency"]) and record["train"]["consistency"] > 1.7


def test_coco_training_masks_are_one_present_category_each(tmp_path):
    from captum_consistency.data import CocoMultiLabel, collate_masked_samples
    from tests._fixtures_data import make_coco_folder

    fx = make_coco_folder(tmp_path / "coco")
    with pytest.raises(ValueError, match="with_masks=True"):
        WithTrainingMasks(CocoMultiLabel(fx.images_dir, fx.ann_file, transform=None), 32)
    ds = CocoMultiLabel(fx.images_dir, fx.ann_file, transform=None, with_masks=True,
                        images_without_annotations="skip")
    wrapped = WithTrainingMasks(ds, 32)
    torch.manual_seed(0)
    samples = [wrapped[i] for i in range(len(wrapped))]
    for s in samples:
        assert s.image.shape == (3, 32, 32) and s.mask.shape == (32, 32)
        assert bool(s.target[s.gradcam_target] > 0)  # the guided class is present in the image
    batch = collate_masked_samples(samples + [None])
    assert batch.masks.shape == (len(samples), 32, 32) and batch.skipped == 1
    assert batch.targets.shape == (len(samples), len(ds.classes))


@pytest.mark.parametrize("extra,message", [
    (["--loss", "gc", "--loss-attribution", "input-x-gradient"], "must be elementwise-gradcam or gradcam"),
    (["--loss", "cgc", "--batch-size", "1"], "--loss cgc needs --batch-size >= 2"),
    (["--loss", "energy", "--loss-lambda", "-1"], "argument --loss-lambda: must be >= 0"),
])
def test_loss_options_are_refused_before_training(tmp_path, capsys, extra, message):
    args = _synthetic_args(tmp_path / "o", 1) + extra
    with pytest.raises(SystemExit) as exc:
        run_recipe(train, args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
