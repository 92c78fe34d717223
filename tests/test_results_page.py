"""docs/results.md shows the quickstart's measured run: its tables are exactly the ones the recipe
writes from the run's results.json, which is kept beside the page (docs/assets/quickstart/).
The home page (docs/index.md) shows the same run's figure and claims, checked the same way."""

import json
from pathlib import Path

import pytest

from captum_consistency.claims import (
    audit_markdown,
    claims_markdown,
    paper_transfer_markdown,
    sweep_markdown,
    transfer_markdown,
)
from captum_consistency.report import table1_markdown
from tests._recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
quickstart = load_recipe("quickstart", prefix="_recipe_page")

ASSETS = ROOT / "docs" / "assets" / "quickstart"
PAGE = (ROOT / "docs" / "results.md").read_text()
HOME = (ROOT / "docs" / "index.md").read_text()


def _load(name):
    return json.loads((ASSETS / name).read_text())


RUNS = ["results.json", "per-image-results.json", "gmp-results.json"]


@pytest.mark.parametrize("name", [r for r in RUNS if (ASSETS / r).exists()])
def test_the_page_shows_the_runs_table1_and_claims(name):
    results = _load(name)
    assert results["status"] == "complete"
    summaries = results["variants"]
    table = table1_markdown({s["name"]: s for s in summaries.values()}, model="ResNet",
                            cue=results["config"]["cue_prob"] > 0)
    assert table.strip() in PAGE, f"docs/results.md does not show the Table 1 of {name}"
    for line in claims_markdown(results["claims"], summaries):
        assert line in PAGE, f"docs/results.md does not state the claim of {name}: {line}"
    if results.get("transfer"):  # runs measured since the transfer table exists
        for line in transfer_markdown(summaries, results["transfer"]):
            assert line in PAGE, f"docs/results.md does not show the transfer table of {name}: {line}"
    if results.get("audit"):  # runs measured since the audit exists
        for line in audit_markdown(summaries, results["audit"], layer=results["config"]["layer"]):
            assert line in PAGE, f"docs/results.md does not show the audit of {name}: {line}"


def test_the_page_compares_the_transfer_with_the_papers_tables_3_and_4():
    """The transfer paragraph is read against the paper's numbers metric by metric, from the
    default run's rows (and the sentence that FullGrad's gain is not reproduced is gone)."""
    results = _load("results.json")
    lines = paper_transfer_markdown(results["variants"])
    assert lines, "the default run must have cMWP and FullGrad rows"
    for line in lines:
        assert line in PAGE, f"docs/results.md does not compare with Tables 3-4: {line}"
    assert "does not reproduce it" not in PAGE


def test_the_page_shows_the_default_runs_sweep_and_set_up():
    results = _load("results.json")
    assert results["benchmark"] == "shapes" and results["config"]["seeds"] >= 3
    assert results["audit"] and results["audit"][0]["comparable"], "the default run is audited"
    sweep = "\n".join(sweep_markdown(results["lambda_sweep"]))
    assert sweep in PAGE
    minutes = f"{results['elapsed_s'] / 60:.1f} min"
    assert minutes in PAGE, f"the page must state the measured time ({minutes})"
    for figure in ("gradcam.png", "lambda_sweep.png"):
        assert (ASSETS / figure).exists() and f"assets/quickstart/{figure}" in PAGE


def test_the_default_run_is_the_recipes_default_configuration():
    """The shipped run is what `make quickstart` runs today (not a tuned one-off)."""
    results = _load("results.json")
    defaults = vars(quickstart.parse_args(["--output-dir", "x"]))
    for key in ("benchmark", "variants", "lambda_sweep", "cue_prob", "stray_cue_prob",
                "object_size", "width", "epochs", "composites", "lam", "seeds", "train_size",
                "test_size", "batch_size", "lr", "classes", "image_size", "layer", "transfer",
                "transfer_images", "audit_images"):
        shipped = results["config"][key]
        default = defaults[key]
        if isinstance(default, tuple):
            shipped = tuple(shipped)
        assert shipped == default, key


def test_the_home_page_shows_the_default_runs_figure_and_claims():
    """The first page shows the result: the Grad-CAM figure and the claim lines the recipe
    writes from the shipped results.json (only its claims, variants, seeds and time are read,
    so sections added to the JSON change nothing here)."""
    results = _load("results.json")
    for line in claims_markdown(results["claims"], results["variants"]):
        assert line in HOME, f"docs/index.md does not state the default run's claim: {line}"
    minutes = f"{results['elapsed_s'] / 60:.1f} min"
    seeds = f"{results['config']['seeds']} seeds"
    for fact in (minutes, seeds, "](assets/quickstart/gradcam.png)"):
        assert fact in HOME, f"docs/index.md must show the default run's {fact}"
    # the audit's headline: the distractors' share of the class's evidence in the output
    base, gc = (results["variants"][v]["audit"]["ablation_share"] for v in ("baseline", "gc"))
    share = f"from {100 * base:.1f}% to {100 * gc:.1f}%"
    assert share in HOME, f"docs/index.md must state the audit's ablation share ({share})"


def test_the_home_page_shows_the_readmes_two_commands():
    readme = (ROOT / "README.md").read_text()
    commands = [line.split("#")[0].strip() for line in
                readme.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
                .strip().splitlines()]
    assert commands == ["make quickstart", "make test"], commands
    for command in commands:
        assert f"\n{command} " in HOME, f"docs/index.md does not show `{command}`"


FINETUNE_RUNS = ["finetune-results.json", "finetune-probe.json", "finetune-confirm.json"]


@pytest.mark.parametrize("name", [r for r in FINETUNE_RUNS if (ASSETS / r).exists()])
def test_the_page_shows_the_finetune_study_tables(name):
    """The fine-tuning and partial-GC subsection shows the cost table the study wrote from
    the JSON kept beside the page, and the plot of that run."""
    results = _load(name)
    assert results["status"] == "complete"
    for line in quickstart.cost_markdown(results["settings"]):
        assert line in PAGE, f"docs/results.md does not show the cost table of {name}: {line}"
    for s in results["settings"].values():
        if s.get("meets_target") is not None:
            assert s["meets_target"] == quickstart.meets_target(s, results["settings"]["baseline"])


def test_the_page_shows_the_finetune_plot():
    if (ASSETS / "finetune-results.json").exists():
        assert "(assets/quickstart/finetune_cost.png)" in PAGE
        assert (ASSETS / "finetune_cost.png").is_file()


def test_the_page_shows_the_default_runs_cost_table_and_plot():
    """gc_finetune is in the default run: its cost table (in seconds of that run and in images)
    and its plot are on the page, from the shipped results.json."""
    import argparse

    results = _load("results.json")
    assert "gc_finetune" in results["variants"]
    settings = quickstart.cost_settings(argparse.Namespace(**results["config"]), results["variants"])
    for line in quickstart.cost_markdown(settings):
        assert line in PAGE, f"docs/results.md does not show the default run's cost table: {line}"
    assert (ASSETS / "training_cost.png").is_file() and "(assets/quickstart/training_cost.png)" in PAGE


def test_the_page_shows_the_losses_study_table():
    """The comparison of the explanation-guided losses is the table the study wrote, complete,
    with every loss at two lambdas on 3 seeds."""
    results = _load("losses-results.json")
    assert results["status"] == "complete" and results["config"]["seeds"] >= 3
    assert set(results["lambdas"]) == set(quickstart.EXPLANATION_LOSSES)
    for line in quickstart.losses_markdown(results["settings"]):
        assert line in PAGE, f"docs/results.md does not show the losses table: {line}"
