"""recipes/train.py's per-epoch TensorBoard logging: Grad-CAM panels of fixed validation images
and composites (gradcam/images, gradcam/composites) and the fixed subset's NQH, PG and CH
(val_subset/*), read back with TensorBoard's event reader; the clamp of --log-images, a
validation set without boxes, and --log-images 0."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captum_consistency.data import SpuriousContextShapes
from captum_consistency.engine import PANEL_TAGS, GradCamPanels, fixed_indices, validation_scalars
from captum_consistency.engine.datasets import dataset_normalization
from captum_consistency.models import SmallResNet
from tests._fixtures_data import make_imagenet_folder
from tests._recipes import load_recipe, run_recipe

train = load_recipe("train", prefix="_recipe_tb")


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


#: The audit's model-level measures, logged where the subset is single-label.
AUDIT = ("ablation_share", "own_cell_predicted")


def test_tiny_run_logs_panels_and_subset_scalars(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    record = run_recipe(train, [
        "--data", "synthetic", "--arch", "resnet18", "--image-size", "64", "--epochs", "2",
        "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "--workers", "0",
        "--synthetic-train-length", "8", "--synthetic-val-length", "12", "--no-progress",
        "--log-images", "50", "--log-subset", "8", "--output-dir", out])
    log = capsys.readouterr().out
    assert "--log-images 50 is larger than the validation set (12 images): logging 12" in log
    assert {"nqh", "pg", "ch"} <= set(record["val_subset"]) <= {"nqh", "pg", "ch", *AUDIT}
    assert record["log_time_s"] > 0
    acc = _events(out / "tensorboard")
    assert set(acc.Tags()["images"]) == set(PANEL_TAGS.values())
    for tag in PANEL_TAGS.values():
        events = acc.Images(tag)
        assert [e.step for e in events] == [1, 2]  # one panel per epoch
        panel = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)))
        assert panel.shape[0] > 12 * 128 and panel.std() > 0  # 12 rows of 128-pixel tiles
    for name in ("nqh", "pg", "ch"):
        values = [e.value for e in acc.Scalars(f"val_subset/{name}")]
        assert len(values) == 2 and all(0 <= v <= 1 for v in values)
    assert acc.Scalars("val_subset/nqh")[-1].value == pytest.approx(record["val_subset"]["nqh"])


def test_validation_set_without_boxes_leaves_localisation_out(tmp_path, capsys, one_thread):
    fx = make_imagenet_folder(tmp_path / "imagenet", num_classes=4, images_per_class=2)
    common = ["--data", "imagenet", "--data-root", fx.root, "--arch", "resnet18", "--image-size",
              "64", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0",
              "--no-progress", "--log-images", "0"]
    record = run_recipe(train, common + ["--output-dir", tmp_path / "run"])
    log = capsys.readouterr().out
    assert log.count("the validation set has no boxes") == 1
    assert "pg" not in record["val_subset"] and "ch" not in record["val_subset"]
    assert {"nqh"} <= set(record["val_subset"]) <= {"nqh", *AUDIT}
    acc = _events(tmp_path / "run" / "tensorboard")
    assert acc.Tags()["images"] == []  # --log-images 0
    assert {t for t in acc.Tags()["scalars"] if t.startswith("val_subset/")} == {
        f"val_subset/{name}" for name in record["val_subset"]}
    # with the validation boxes: PG and CH of the subset's whole images (grouped by size)
    record = run_recipe(train, common + ["--boxes", fx.boxes_dirs["val"], "--log-subset", "6",
                                         "--output-dir", tmp_path / "boxes"])
    assert "no boxes" not in capsys.readouterr().out
    assert {"nqh", "pg", "ch"} <= set(record["val_subset"])


def test_panels_show_the_same_images_and_composites_every_time():
    val = SpuriousContextShapes("val", num_classes=4, length=40, image_size=32, seed=0)
    mean, std = dataset_normalization("synthetic")
    first = GradCamPanels(val, val.classes, mean, std, num_images=6, seed=1)
    again = GradCamPanels(val, val.classes, mean, std, num_images=6, seed=1)
    pool = fixed_indices(40, 6 + 32)  # the panel's images and the distractor pool
    assert first.indices == again.indices == [pool[p] for p in fixed_indices(len(pool), 6)]
    assert first.num_composites == 6 and torch.equal(first.composites, again.composites)
    assert torch.equal(first.cells, torch.arange(6) % 4)
    titles = first._titles(first.composite_indices, first.composite_labels, first.cells)
    assert titles[0] == f"#{first.indices[0]} {val.classes[int(first.labels[0])]}, cell 0"
    model = SmallResNet(4, widths=(8, 8, 16, 16)).eval()
    panels = first.panels(model, epoch=3, device=torch.device("cpu"))
    assert set(panels) == {"images", "composites"}
    assert all(p.dtype == np.uint8 and p.ndim == 3 for p in panels.values())


def test_fixed_indices_and_scalars_dict():
    assert fixed_indices(10, 4) == [0, 3, 6, 9] and fixed_indices(3, 8) == [0, 1, 2]
    assert fixed_indices(5, 0) == []
    val = SpuriousContextShapes("val", num_classes=4, length=16, image_size=32, seed=0)
    whole = SpuriousContextShapes("val", num_classes=4, length=16, image_size=32, seed=0, annotations=True)
    loader = torch.utils.data.DataLoader(val, batch_size=8)
    model = SmallResNet(4, widths=(8, 8, 16, 16)).eval()
    crop_only = validation_scalars(model, loader, torch.device("cpu"), 4, audit=False)
    assert set(crop_only) == {"nqh"}
    both = validation_scalars(model, loader, torch.device("cpu"), 4,
                              whole_loader=torch.utils.data.DataLoader(whole, batch_size=8))
    assert set(both) == {"nqh", "pg", "ch", *AUDIT} and both["nqh"] == crop_only["nqh"]  # same composites
    # the audit's share is audit_model's on the same loader (cells emptied)
    assert 0.0 <= both["ablation_share"] <= 1.0 and 0.0 <= both["own_cell_predicted"] <= 1.0


def test_logging_does_not_change_what_is_trained(tmp_path, one_thread):
    """The panels and the subset's scalars iterate loaders, which draw seeds from torch's
    global generator, as the training transforms (random crops and flips) do; the logging runs
    on a fork of it, so the trained weights are the same with the logging on and off."""
    fx = make_imagenet_folder(tmp_path / "imagenet", num_classes=4, images_per_class=2)
    common = ["--data", "imagenet", "--data-root", fx.root, "--arch", "resnet18", "--image-size",
              "64", "--epochs", "2", "--batch-size", "4", "--lr", "0.01", "--device", "cpu",
              "--workers", "0", "--no-progress"]
    run_recipe(train, common + ["--log-images", "2", "--log-subset", "8", "--output-dir", tmp_path / "on"])
    run_recipe(train, common + ["--log-images", "0", "--log-subset", "0", "--output-dir", tmp_path / "off"])
    on = torch.load(tmp_path / "on" / "checkpoint.pth", weights_only=True)["model"]
    off = torch.load(tmp_path / "off" / "checkpoint.pth", weights_only=True)["model"]
    assert on.keys() == off.keys()
    for key in on:
        assert torch.equal(on[key], off[key]), key
