"""The quickstart's fine-tuning pieces: the ``gc_finetune`` variant writes the cost
column and the NQH-against-cost plot; ``--finetune-study`` writes its JSON, table and plot."""

import json

from PIL import Image

from tests._recipes import load_recipe

quickstart = load_recipe("quickstart")

CHEAP = ["--fast", "--no-progress", "--workers", "1", "--transfer", "none", "--audit-images", "0",
         "--lambda-sweep", "none", "--fgsm-eps", "0"]


def test_fast_gc_finetune_variant_writes_the_cost_column_and_plot(tmp_path, one_thread):
    out = tmp_path / "qs"
    rc = quickstart.main(["--output-dir", str(out), *CHEAP, "--variants", "baseline,gc,gc_finetune"])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "## Training cost" in report and "| cost (s) | cost (images) |" in report
    assert "![NQH against relative training cost](training_cost.png)" in report
    assert Image.open(out / "training_cost.png").size[0] > 100
    variants = json.loads((out / "results.json").read_text())["variants"]
    base, gc, tuned = (variants[k]["per_seed"][0] for k in ("baseline", "gc", "gc_finetune"))
    # the fine-tuned model's cost counts its baseline's training: the same baseline run
    assert tuned["train_images"] > base["train_images"] > 0
    assert tuned["finetune_time_s"] < tuned["train_time_s"]
    # 96 images, batch 32: 3 plain steps; GC adds its composites (4 images each)
    assert base["train_images"] == 96 and gc["train_images"] > 96
    assert variants["gc_finetune"]["rel_images"] > 1


def test_fast_finetune_study_writes_json_table_and_plot(tmp_path, one_thread):
    out = tmp_path / "study"
    rc = quickstart.main(["--output-dir", str(out), *CHEAP, "--finetune-study",
                          "--study-settings", "finetune,every", "--study-epochs", "1",
                          "--study-every", "2"])
    assert rc == 0
    results = json.loads((out / "finetune-results.json").read_text())
    assert results["status"] == "complete" and set(results["settings"]) == {"baseline", "finetune_1", "every_2"}
    base, every = results["settings"]["baseline"], results["settings"]["every_2"]
    assert base["rel_images"] == 1.0 and base["meets_target"] is None
    # every 2nd of 3 steps (steps 0 and 2) runs GC: fewer images than a full GC run
    assert 1 < every["rel_images"] < results["settings"]["finetune_1"]["rel_images"] + 1
    assert isinstance(every["meets_target"], bool)
    report = (out / "report.md").read_text()
    assert "partial GC: GC every 2 steps" in report
    assert (out / "finetune_cost.png").is_file()
