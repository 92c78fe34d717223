"""Evaluation with any registry method, and the transfer table of evaluate_transfer on a tiny
model with the quickstart's loaders."""

import pytest
import torch
from torch.utils.data import DataLoader

from captum_consistency.data import DatasetDistractorSampler, DistractorFallback, SpuriousContextShapes, gather_distractors
from captum_consistency.engine import TRANSFER_METHODS, evaluate_transfer
from captum_consistency.engine.evaluation import METHODS, SaliencyExplainer, evaluate_interpretations
from captum_consistency.attr import available_attributions, get_attribution
from captum_consistency.models import SmallResNet


@pytest.fixture(scope="module")
def setup():
    """The quickstart's evaluation set-up, tiny: a SmallResNet and SpuriousContextShapes test
    images (whole images with exact masks for PG/CH, the same images for NQH composites)."""
    torch.manual_seed(0)
    model = SmallResNet(3, widths=(8, 8, 16, 16)).eval()
    test = SpuriousContextShapes("test", num_classes=3, image_size=32, length=12, seed=0)
    crop_loader = DataLoader(test, batch_size=6)
    whole_loader = DataLoader(test.with_annotations(), batch_size=6)
    fallback = DistractorFallback(test, DatasetDistractorSampler(test.targets, seed=1, num_classes=3))
    return model, test, whole_loader, crop_loader, fallback


def _generators():
    return torch.Generator().manual_seed(5), torch.Generator().manual_seed(7)


def _transfer(setup, methods, **kw):
    model, test, whole_loader, crop_loader, fallback = setup
    generator, spg_generator = _generators()

    def make_distractors(images, targets, gc_targets):
        # every draw from `generator`, the fallback's included: the same composites per method
        return gather_distractors(images, targets, gc_targets, generator=generator,
                                  fallback=lambda g: fallback(g, generator))

    return evaluate_transfer(
        model, methods, whole_loader, crop_loader, "cpu", num_classes=3,
        make_distractors=make_distractors, generator=generator, spg_generator=spg_generator,
        tolerance=15.0 * 32 / 224, progress=False, **kw,
    )


def test_methods_are_the_registry():
    assert METHODS == tuple(available_attributions())
    assert len(TRANSFER_METHODS["fast"]) >= 8 and TRANSFER_METHODS["all"] == METHODS
    fast = TRANSFER_METHODS["fast"]
    assert set(fast) <= set(METHODS)
    assert any(m.startswith("captum:") for m in fast) and any(m.startswith("pgc:") for m in fast)
    # the slow ones (tens to thousands of forward passes per image) are not "fast"
    assert not set(fast) & {"captum:integrated-gradients", "captum:occlusion", "pgc:scorecam",
                            "pgc:ablationcam", "captum:smoothgrad"}


def test_explainer_uses_the_registry_at_the_methods_resolution():
    torch.manual_seed(0)
    model = SmallResNet(3, widths=(8, 8, 16, 16)).eval()
    x = torch.randn(2, 3, 32, 32)
    index, classes = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1])
    for name, size in (("pgc:gradcam++", (32, 32)), ("cmwp", (8, 8)), ("captum:layer-gradcam", (4, 4))):
        maps = SaliencyExplainer(model, name)(x, index, classes)
        expected = get_attribution(name, model).attribute(x[index], classes, upsample=False)
        assert maps.shape == (3, 1) + size
        torch.testing.assert_close(maps, expected)
    with pytest.raises(ValueError, match="unknown attribution 'lime'"):
        SaliencyExplainer(model, "lime")
    with pytest.raises(ValueError, match="does not take option"):
        SaliencyExplainer(model, "captum:saliency", options={"n_steps": 3})


def test_transfer_rows_equal_single_method_evaluations(setup):
    """Every method sees the same composites and SPG draws: a method's row does not depend on
    the methods evaluated before it, and equals evaluate_interpretations with fresh generators."""
    model, test, whole_loader, crop_loader, fallback = setup
    rows = _transfer(setup, ["elementwise-gradcam", "pgc:gradcam", "captum:saliency"])
    assert list(rows) == ["elementwise-gradcam", "pgc:gradcam", "captum:saliency"]
    alone = _transfer(setup, ["captum:saliency"])["captum:saliency"]
    for key in ("pg", "spg_mean", "ch", "nqh", "num_images", "num_composites", "skipped"):
        assert rows["captum:saliency"][key] == alone[key], key
    generator, spg_generator = _generators()
    reference = evaluate_interpretations(
        model, "elementwise-gradcam", whole_loader, crop_loader, "cpu", num_classes=3,
        make_distractors=lambda i, t, g: gather_distractors(
            i, t, g, generator=generator, fallback=lambda c: fallback(c, generator)),
        generator=generator, spg_generator=spg_generator, tolerance=15.0 * 32 / 224, progress=False,
    )
    for key in ("pg", "spg_mean", "ch", "nqh"):
        assert rows["elementwise-gradcam"][key] == reference[key], key
    for row in rows.values():
        assert row["num_images"] + row["skipped"] >= 12 and row["num_composites"] > 0
        for key in ("pg", "ch", "nqh"):
            assert 0.0 <= row[key] <= 1.0
    # different methods, different maps
    assert rows["pgc:gradcam"]["ch"] != rows["captum:saliency"]["ch"]


def test_fast_transfer_table_on_a_tiny_model(setup):
    rows = _transfer(setup, "fast", method_options={"captum:deeplift": {}})
    assert list(rows) == list(TRANSFER_METHODS["fast"])
    for name, row in rows.items():
        assert set(row) >= {"pg", "ch", "nqh", "spg_mean", "skipped", "time_s"}, name
        assert all(row[k] is None or 0.0 <= row[k] <= 1.0 for k in ("pg", "ch", "nqh")), name
        assert row["num_images"] > 0, name


def test_transfer_errors(setup):
    with pytest.raises(ValueError, match="one of fast, all"):
        _transfer(setup, "quick")
    with pytest.raises(ValueError, match="unknown attribution 'lime'"):
        _transfer(setup, ["lime"])
    with pytest.raises(ValueError, match="not evaluated: captum:occlusion"):
        _transfer(setup, ["captum:saliency"], method_options={"captum:occlusion": {}})
    with pytest.raises(ValueError, match="twice"):
        _transfer(setup, ["pgc:gradcam", "PGC:GradCAM"])
    # a method that cannot handle the model: recorded, the others still run
    rows = _transfer(setup, ["captum:saliency", "cmwp"], method_options={"cmwp": {"eps": 1}},
                     errors="record")
    assert "does not take option" in rows["cmwp"]["error"] and rows["captum:saliency"]["pg"] is not None
