"""captum_consistency.engine.shapes_benchmark: the quickstart's evaluation, as library code."""

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from captum_consistency.data import SpuriousContextShapes
from captum_consistency.engine.evaluation import SaliencyExplainer
from captum_consistency.engine.shapes_benchmark import cue_statistics, evaluate_on_shapes, figure_inputs
from captum_consistency.metrics import content_heatmap
from captum_consistency.models import SmallResNet


def _setup(cue_prob):
    torch.manual_seed(0)
    model = SmallResNet(3, widths=(8, 8, 16, 16)).eval()
    test = SpuriousContextShapes("test", num_classes=3, image_size=32, length=24, seed=0,
                                 cue_prob=cue_prob, object_size=(0.13, 0.25))
    return model, test


def test_cue_statistics_by_hand():
    model, test = _setup(cue_prob=1.0)
    stats = cue_statistics(model, DataLoader(test.with_annotations(), batch_size=10),
                           torch.device("cpu"), model.layer4)
    samples = [test.with_annotations()[i] for i in range(len(test))]
    images = torch.stack([s.image for s in samples])
    labels = torch.tensor([s.label for s in samples])
    cues = torch.tensor([s.cue_label for s in samples])
    with torch.no_grad():
        pred = model(images).argmax(1)
    consistent = labels == cues
    assert 0 < int(consistent.sum()) < len(test)
    assert math.isclose(stats["top1_consistent"], float((pred == labels)[consistent].double().mean()))
    assert math.isclose(stats["top1_conflicting"], float((pred == labels)[~consistent].double().mean()))
    assert math.isclose(stats["follows_cue"], float((pred == cues)[~consistent].double().mean()))
    maps = SaliencyExplainer(model, "elementwise-gradcam", layer=model.layer4)(
        images, torch.arange(len(test)), labels)
    maps = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False).clamp(min=0)
    mass = content_heatmap(maps, torch.stack([s.cue_mask for s in samples]))
    assert math.isclose(stats["cue_mass"], float(mass[~mass.isnan()].double().mean()), rel_tol=1e-5)


def test_evaluate_on_shapes_keys_and_ranges():
    for cue_prob, cue_keys in ((0.0, set()), (1.0, {"top1_consistent", "top1_conflicting",
                                                    "follows_cue", "cue_mass", "cue_gap"})):
        model, test = _setup(cue_prob)
        out = evaluate_on_shapes(model, test, torch.device("cpu"), layer=model.layer4,
                                 fgsm_epsilons=(0.0, 2.0), batch_size=12, progress=False)
        assert set(out) == {"top1", "pg", "spg_mean", "spg_std", "ch", "nqh", "skipped",
                            "zero_maps", "zero_maps_composite", "fgsm"} | cue_keys
        assert list(out["fgsm"]) == ["0", "2"] and out["fgsm"]["0"] == out["top1"]
        assert all(0.0 <= out[k] <= 1.0 for k in ("top1", "zero_maps", "zero_maps_composite"))


def test_figure_inputs_put_each_object_box_in_its_cell():
    test = SpuriousContextShapes("test", num_classes=4, image_size=32, length=40, cue_prob=0.0,
                                 stray_cue_prob=0.0, object_size=(0.2, 0.3), seed=0)
    inputs = figure_inputs(test, 6)
    assert inputs.images.shape == (6, 3, 64, 64) and inputs.rgb.shape == (6, 64, 64, 3)
    assert inputs.cue_boxes is None and inputs.classes.tolist() == list(test.targets[:6])
    for i in range(6):
        k = i % 4  # image i sits in cell i % 4 (k = 2 * row + col)
        row, col = divmod(k, 2)
        x0, y0, x1, y1 = inputs.boxes[i].tolist()
        assert col * 32 <= x0 <= x1 <= (col + 1) * 32 and row * 32 <= y0 <= y1 <= (row + 1) * 32
        # the cell shows image i itself
        assert (inputs.rgb[i, row * 32:(row + 1) * 32, col * 32:(col + 1) * 32] == test.rgb(i)).all()
        assert f"cell {k}" in inputs.titles[i]


def test_figure_inputs_with_a_cue_alternate_conflicting_and_consistent_images():
    test = SpuriousContextShapes("test", num_classes=4, image_size=32, length=40, seed=0)
    inputs = figure_inputs(test, 4)
    assert inputs.images.shape == (4, 3, 32, 32) and inputs.cue_boxes.shape == (4, 4)
    conflicting = set(test.conflicting_indices().tolist())
    classes, cues = [], []
    for title in inputs.titles:
        obj, cue = title.split(" / ")
        classes.append(obj)
        cues.append(cue)
    assert classes[0] != cues[0] and classes[1] == cues[1]  # conflicting first, then consistent
    assert len(conflicting) > 0
