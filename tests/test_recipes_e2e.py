"""End to end: recipes/train.py -> kill -> resume -> evaluate.py -> robustness.py, on the CPU.

On tiny data sets written in the real on-disk formats (ImageFolder JPEGs with VOC XML boxes,
COCO JSON with polygon and RLE masks) and on the synthetic generator. The recipes run
in-process through their ``main(args)`` (as torchvision's references allow), except the run
that is killed with SIGKILL and the torchrun run, which are real subprocesses.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captum_consistency import SkippedImageWarning
from tests._fixtures_data import corrupt_file, make_coco_folder, make_imagenet_folder
from tests._recipes import load_recipe, run_recipe, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SIZE = "64"  # --image-size: composites are 128 x 128


train = load_recipe("train")
evaluate = load_recipe("evaluate")
robustness = load_recipe("robustness")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), num_classes=3, images_per_class=4)


def _inet_train_args(fx, out, epochs, *extra):
    return ["--data", "imagenet", "--data-root", fx.root, "--arch", "resnet18", "--image-size", SIZE,
            "--epochs", epochs, "--batch-size", "4", "--lr", "0.01", "--device", "cpu",
            "--workers", "0", "--output-dir", out, "--seed", "3", "--no-progress", *extra]


def _independent_imagenet_metrics(ckpt_path, fx, size):
    """Top-1, PG, CH and the expected SPG of a checkpoint on the fixture's validation images,
    computed without the library's pipeline: torchvision builds the model and transforms the
    images one by one, Captum gives the element-wise Grad-CAM (``LayerGradientXActivation``
    at ``layer4``, summed over channels, ReLU: Eq. 3), masks come from the boxes the fixture
    wrote, and only the public metric functions score them (the paper's protocol: whole image
    with short side 2S, map resized to the original size, 15 px)."""
    import torchvision
    import torchvision.transforms.v2.functional as TF
    from captum.attr import LayerGradientXActivation
    from PIL import Image
    from scipy.ndimage import distance_transform_edt

    from captum_consistency.metrics import content_heatmap, pointing_game

    ckpt = torch.load(ckpt_path, weights_only=True)
    model = torchvision.models.resnet18(num_classes=ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    attribution = LayerGradientXActivation(model, model.layer4)
    hits, ch, spg, correct = {}, [], [], 0
    for path, label in zip(fx.files["val"], fx.labels["val"]):
        pixels = TF.pil_to_tensor(Image.open(path).convert("RGB"))  # uint8, as v2.ToImage
        h, w = pixels.shape[-2:]
        whole = TF.normalize(TF.to_dtype(TF.resize(pixels, 2 * size, antialias=True), torch.float32, scale=True), mean, std)
        cam = attribution.attribute(whole[None], target=label).sum(1, keepdim=True).relu()
        cam = torch.nn.functional.interpolate(cam.detach(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        mask = torch.zeros(1, h, w, dtype=torch.bool)
        for x1, y1, x2, y2, _ in fx.boxes[Path(path).stem]:  # VOC corners, 1-based, inclusive
            mask[0, max(y1 - 1, 0):y2, max(x1 - 1, 0):x2] = True
        hits.setdefault(label, []).append(float(pointing_game(cam, mask)[0]))
        ch.append(float(content_heatmap(cam, mask)[0]))
        near = torch.from_numpy(distance_transform_edt(~mask[0].numpy()) < 15)  # the SPG margin
        spg.append(float(cam[0][near].sum() / cam[0].sum()))  # SPG's expectation
        crop = TF.center_crop(TF.resize(pixels, round(size * 256 / 224), antialias=True), size)
        crop = TF.normalize(TF.to_dtype(crop, torch.float32, scale=True), mean, std)
        with torch.no_grad():
            correct += int(model(crop[None]).argmax(1).item() == label)
    return {
        "top1": correct / len(ch),
        "pg": sum(sum(v) / len(v) for v in hits.values()) / len(hits),  # per class, as the paper
        "ch": sum(ch) / len(ch),
        "spg_expected": sum(spg) / len(spg),
    }


def test_help_of_every_recipe():
    for module in (train, evaluate, robustness):
        text = module.get_args_parser().format_help()
        assert "--output-dir" in text and "--device" in text
    assert "--gc-lambda" in train.get_args_parser().format_help()
    assert "--method" in evaluate.get_args_parser().format_help()
    out = subprocess.run([sys.executable, str(RECIPES / "train.py"), "--help"], capture_output=True,
                         text=True, env=subprocess_env(), timeout=120)
    assert out.returncode == 0 and "--distractors" in out.stdout


def test_imagenet_train_kill_resume_evaluate_robustness(imagenet, tmp_path, one_thread):
    fx = imagenet
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    ckpt = killed / "checkpoint.pth"

    # 1. A real process, SIGKILLed while it trains its second epoch.
    proc = subprocess.Popen([sys.executable, str(RECIPES / "train.py"),
                             *map(str, _inet_train_args(fx, killed, 4))], env=subprocess_env(),
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
        run_recipe(train, _inet_train_args(fx, killed, 4))
    # A checkpoint of another architecture: a clear error naming the file.
    with pytest.raises(ValueError, match=r"checkpoint\.pth.*'resnet18'.*'resnet50'"):
        run_recipe(train, _inet_train_args(fx, tmp_path / "other", 4, "--arch", "resnet50",
                                     "--resume", ckpt))

    # 2. Resume to the end, and an uninterrupted run with the same seed: identical weights.
    record = run_recipe(train, _inet_train_args(fx, killed, 4, "--resume", ckpt))
    assert record["epoch"] == 4
    run_recipe(train, _inet_train_args(fx, reference, 4))
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
    metrics = run_recipe(evaluate, ["--checkpoint", ckpt, "--boxes", fx.boxes_dirs["val"], "--device", "cpu",
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
    # The same numbers from an independent computation (Captum maps, public metric functions).
    reference = _independent_imagenet_metrics(ckpt, fx, int(SIZE))
    assert saved["top1"] == pytest.approx(reference["top1"], abs=1e-12)
    assert saved["pg"] == pytest.approx(reference["pg"], abs=1e-12)
    assert saved["ch"] == pytest.approx(reference["ch"], abs=1e-4)
    # 12 images x 100 draws x 5 runs: the SPG mean's standard error is below 0.01.
    assert saved["spg_mean"] == pytest.approx(reference["spg_expected"], abs=0.03)
    table = (tmp_path / "eval" / "table.md").read_text().splitlines()
    assert table[0] == "| Model | Top-1 Acc (%) | PG | SPG | CH (%) | NQH (%) |"
    assert table[2].startswith("| ResNet18 GC (elementwise-gradcam) | ")
    assert f"{100 * saved['pg']:.2f}" in table[2] and "±" in table[2]
    # Batch norm was folded into the convolutions (the default); unfolded, the numbers agree.
    unfolded = run_recipe(evaluate, ["--checkpoint", ckpt, "--boxes", fx.boxes_dirs["val"], "--device", "cpu",
                               "--workers", "0", "--batch-size", "4", "--output-dir", tmp_path / "eval-bn",
                               "--no-progress", "--no-fold-bn", "--no-nqh"])
    for key in ("top1", "pg", "spg_mean", "spg_std", "num_images"):
        assert unfolded[key] == metrics[key], key
    assert unfolded["ch"] == pytest.approx(metrics["ch"], abs=1e-6)

    # 4. Robustness (Table 6): accuracy under FGSM for the paper's epsilons.
    rob = run_recipe(robustness, ["--checkpoint", ckpt, "--device", "cpu", "--workers", "0",
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
    run_recipe(train, _inet_train_args(fx, out, 1, "--gc-lambda", "0", "--gmp", "--no-val"))
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
        run_recipe(evaluate, args)
    with pytest.raises(OSError, match=jpeg.name + ".*--skip-corrupt"):
        run_recipe(evaluate, args + ["--skip-missing-boxes"])
    with pytest.warns(SkippedImageWarning, match=jpeg.name):
        metrics = run_recipe(evaluate, args + ["--skip-missing-boxes", "--skip-corrupt", "--method", "gradcam"])
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
    record = run_recipe(train, ["--data", "coco", "--data-root", root, "--train-split", "train2017",
                          "--val-split", "val2017", "--arch", "resnet18", "--image-size", SIZE,
                          "--epochs", "1", "--batch-size", "3", "--device", "cpu", "--workers", "0",
                          "--distractors", "dataset", "--output-dir", out, "--no-progress"])
    assert {"f1_per_class", "f1_overall"} <= set(record["train"]) and "consistency" in record["train"]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["classes"] == ["person", "car", "dog"] and ckpt["multilabel"] is True
    assert ckpt["args"]["gc_lambda"] is None  # the paper's COCO lambda (1) was used
    metrics = run_recipe(evaluate, ["--checkpoint", out / "checkpoint.pth", "--split", "val2017",
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
        run_recipe(robustness, ["--checkpoint", out / "checkpoint.pth", "--device", "cpu",
                          "--output-dir", tmp_path / "fgsm"])


def test_synthetic_torchrun_two_processes_then_evaluate(tmp_path):
    out = tmp_path / "ddp"
    common = ["--data", "synthetic", "--arch", "resnet18", "--image-size", SIZE, "--batch-size", "4",
              "--device", "cpu", "--workers", "0", "--synthetic-train-length", "16",
              "--synthetic-val-length", "8", "--lr", "0.01", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(RECIPES / "train.py"), *common, "--epochs", "1",
           "--output-dir", str(out)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["train"]["samples"] == 16 and record["train"]["steps"] == 2  # 2 ranks x 2 x 4
    assert record["val"]["samples"] == 8  # every validation image counted once

    metrics = run_recipe(evaluate, ["--checkpoint", out / "checkpoint.pth", "--device", "cpu",
                              "--workers", "0", "--batch-size", "4", "--method", "gradcam",
                              "--output-dir", tmp_path / "eval", "--no-progress"])
    assert metrics["split"] == "test" and metrics["classified_images"] == 8
    assert metrics["tolerance"] == pytest.approx(15 * 64 / 224)
    assert metrics["num_images"] + metrics["skipped_detail"]["degenerate_maps_or_masks"] == 8

    # --audit: the model-level measures beside the metrics, in one process and over two
    audit_args = ["--checkpoint", out / "checkpoint.pth", "--device", "cpu", "--workers", "0",
                  "--batch-size", "4", "--audit", "--audit-faithfulness-images", "3",
                  "--audit-road-images", "1", "--audit-randomization-images", "3", "--no-progress"]
    one = run_recipe(evaluate, audit_args + ["--output-dir", tmp_path / "audit1"])["audit"]
    assert one["num_composites"] == 8 and one["num_faithfulness_images"] == 3
    assert one["num_road_images"] == 1 and len(one["randomization"]) >= 3
    assert one == json.loads((tmp_path / "audit1" / "metrics.json").read_text())["audit"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(RECIPES / "evaluate.py"), *map(str, audit_args), "--output-dir", str(tmp_path / "audit2")]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = json.loads((tmp_path / "audit2" / "metrics.json").read_text())["audit"]
    assert two["num_composites"] == 8 and two["num_faithfulness_images"] == 6  # 3 per process
    for key in ("ablation_share", "own_cell_probability", "own_cell_predicted", "deletion_gradcam"):
        assert two[key] is None or math.isfinite(two[key]), key
    assert list(two["randomization"]) == list(one["randomization"])


def _copy_with_corrupt_train_image(fx, tmp_path):
    root = tmp_path / "inet"
    shutil.copytree(fx.root, root)
    victim = root / Path(fx.files["train"][5]).relative_to(fx.root)
    corrupt_file(victim)
    return root, victim


def test_torchrun_skip_corrupt_rank_with_an_empty_batch_does_not_hang(imagenet, tmp_path):
    # Batch size 1, one undecodable training image: one rank's batch is empty at one step.
    # Every rank must skip that step together (DDP's backward is collective), or the others
    # wait forever for its gradients.
    root, _ = _copy_with_corrupt_train_image(imagenet, tmp_path)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(RECIPES / "train.py"), *map(str, _inet_train_args(imagenet, out, 1)),
           "--data-root", str(root), "--batch-size", "1", "--gc-lambda", "0", "--skip-corrupt",
           "--no-val"]
    log = tmp_path / "torchrun.log"  # a file, not a pipe: a hung rank would hold a pipe open
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            # SIGTERM: torchrun stops its ranks (each in a session of its own) before exiting.
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail("torchrun did not finish: a rank waits for a step another skipped\n"
                        + log.read_text()[-3000:])
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    train_stats = record["train"]
    # 12 images, 6 steps of 1 image per rank; the step with the corrupt image is skipped by both.
    assert train_stats["skipped"] == 1 and train_stats["skipped_steps"] == 1
    assert train_stats["steps"] == 5 and train_stats["samples"] == 10


def test_batch_shrunk_below_what_batch_norm_needs_is_skipped(imagenet, tmp_path, one_thread):
    # At 32 px a ResNet's layer4 is 1x1: batch norm needs two images. A batch of 2 that
    # --skip-corrupt shrinks to 1 is skipped instead of crashing in the middle of the epoch.
    root, victim = _copy_with_corrupt_train_image(imagenet, tmp_path)
    with pytest.warns(SkippedImageWarning, match=victim.name):
        record = run_recipe(train, _inet_train_args(imagenet, tmp_path / "run", 1) + [
            "--data-root", root, "--image-size", "32", "--batch-size", "2", "--gc-lambda", "0",
            "--skip-corrupt", "--no-val"])
    assert record["train"]["skipped"] == 1 and record["train"]["skipped_steps"] == 1
    assert record["train"]["steps"] == 5 and record["train"]["samples"] == 10


def test_train_checks_sizes_and_epochs_before_reading_any_data(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"  # reading the data would fail with FileNotFoundError
    base = ["--data", "imagenet", "--data-root", missing, "--device", "cpu", "--workers", "0",
            "--output-dir", tmp_path / "out", "--no-progress"]
    with pytest.raises(ValueError, match="--image-size 32 is too small for alexnet: it needs at least 63"):
        run_recipe(train, base + ["--arch", "alexnet", "--image-size", "32"])
    with pytest.raises(ValueError, match="--batch-size 1 with --image-size 32 cannot train resnet18.*"
                                         "--batch-size 2 or more, or --image-size 33 or more"):
        run_recipe(train, base + ["--arch", "resnet18", "--image-size", "32", "--batch-size", "1",
                                  "--gc-lambda", "0"])
    with pytest.raises(FileNotFoundError):  # sizes that work: the data is read next
        run_recipe(train, base + ["--arch", "resnet18", "--image-size", "33", "--batch-size", "1",
                                  "--gc-lambda", "0"])
    for epochs in ("0", "-2"):
        with pytest.raises(SystemExit):
            train.get_args_parser().parse_args(["--data", "synthetic", "--output-dir", "x",
                                                "--epochs", epochs])
        assert "argument --epochs: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_one_data_option_set_for_all_recipes():
    data = ["--data", "imagenet", "--data-root", "r", "--boxes", "b", "--train-boxes", "tb", "--ann-file", "a",
            "--val-ann-file", "v", "--train-split", "t", "--val-split", "w", "--split", "s",
            "--skip-corrupt", "--skip-missing-boxes", "--allow-empty-classes",
            "--synthetic-classes", "3", "--synthetic-train-length", "20",
            "--synthetic-val-length", "10", "--synthetic-cue-strength", "0.5", "--synthetic-seed", "7"]
    required = {train: ["--output-dir", "o"], evaluate: ["--output-dir", "o", "--checkpoint", "c"],
                robustness: ["--output-dir", "o", "--checkpoint", "c"]}
    # train.py reads --boxes / --skip-missing-boxes for the per-epoch PG and CH (--log-subset)
    # and --train-boxes for a mask-guided --loss
    ignored = {train: {"--split"},
               evaluate: {"--train-split", "--val-split", "--val-ann-file", "--synthetic-train-length",
                          "--train-boxes"},
               robustness: {"--boxes", "--train-boxes", "--ann-file", "--skip-missing-boxes",
                            "--train-split"}}
    for module in (train, evaluate, robustness):
        args = module.get_args_parser().parse_args(data + required[module])
        assert args.boxes == "b" and args.split == "s" and args.synthetic_seed == 7
        assert args.skip_corrupt and args.allow_empty_classes
        name = module.__name__.split("_")[-1]
        parser = module.get_args_parser()
        helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
        for option in ignored[module]:
            assert helps[option].endswith(f"[ignored by {name}.py]"), (name, option)
        for option in ("--data", "--data-root", "--skip-corrupt", "--allow-empty-classes"):
            assert "[ignored" not in helps[option], (name, option)  # used by every recipe
        if module is train:
            assert "[ignored" not in helps["--boxes"] + helps["--skip-missing-boxes"]
        assert f"[ignored by {name}.py]" in " ".join(parser.format_help().split())
