"""The quickstart's ``--losses`` study (explanation-guided losses on the same data) and the
default run's ``gc_finetune``, which fine-tunes the baseline job's own model."""

import json

import pytest

from tests._recipes import load_recipe

quickstart = load_recipe("quickstart")

CHEAP = ["--fast", "--no-progress", "--workers", "1", "--transfer", "none",
         "--lambda-sweep", "none", "--fgsm-eps", "0"]


def test_fast_losses_study_writes_every_setting_with_audit_and_cost(tmp_path, one_thread):
    out = tmp_path / "losses"
    rc = quickstart.main(["--output-dir", str(out), *CHEAP, "--audit-images", "16",
                          "--losses", "energy,cgc,gc"])
    assert rc == 0
    results = json.loads((out / "losses-results.json").read_text())
    assert results["status"] == "complete"
    # each loss at its default lambda (GC: --lam) and at --losses-factor (4) times it
    assert results["lambdas"] == {"energy": [1.0, 4.0], "cgc": [0.5, 2.0], "gc": [8.0, 32.0]}
    settings = results["settings"]
    assert set(settings) == {"baseline", "energy@1", "energy@4", "cgc@0.5", "cgc@2", "gc@8", "gc@32"}
    for key, s in settings.items():
        assert s["runs"] == 1 and s["diverged"] == 0, key
        assert 0 <= s["top1"] <= 1 and s["audit"]["ablation_share"] is not None, key
        assert s["rel_time"] > 0, key
    assert settings["baseline"]["rel_time"] == 1.0
    # how much GC costs is measured in the study, not asserted here: the seconds of a 1-epoch
    # --fast run are too noisy to order (CI measured GC at 0.38 of the baseline)
    report = (out / "report.md").read_text()
    assert "| Loss | lambda | top-1 |" in report and "| Energy | 4 |" in report


def test_losses_study_records_a_diverged_setting_and_goes_on(tmp_path, one_thread):
    out = tmp_path / "diverged"
    rc = quickstart.main(["--output-dir", str(out), *CHEAP, "--audit-images", "0",
                          "--losses", "energy", "--losses-factor", "1e30"])
    assert rc == 0
    settings = json.loads((out / "losses-results.json").read_text())["settings"]
    bad = settings["energy@1e+30"]
    assert bad["diverged"] == 1 and "non-finite" in bad["diverged_messages"][0]
    assert settings["energy@1"]["diverged"] == 0 and settings["energy@1"]["top1"] is not None
    assert "| Energy | 1e+30 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--losses", "nope"], "--losses must be 'all' or a subset of"),
    (["--losses", "--finetune-study"], "two studies"),
    (["--losses", "energy", "--losses-factor", "1"], "--losses-factor must be"),
])
def test_losses_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        quickstart.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_gc_finetune_fine_tunes_the_baseline_job_model(tmp_path, one_thread):
    """Chained after the baseline job or training its own baseline, the fine-tuned model is
    the same; the chained one costs the baseline's training once."""
    runs = {}
    for name, variants in (("chained", "baseline,gc_finetune"), ("alone", "gc_finetune")):
        out = tmp_path / name
        assert quickstart.main(["--output-dir", str(out), *CHEAP, "--audit-images", "0",
                                "--variants", variants]) == 0
        runs[name] = json.loads((out / "results.json").read_text())["variants"]
    chained, alone = runs["chained"]["gc_finetune"]["per_seed"][0], runs["alone"]["gc_finetune"]["per_seed"][0]
    for key in ("top1", "pg", "ch", "nqh", "train_images"):
        assert chained[key] == alone[key], key
    base = runs["chained"]["baseline"]["per_seed"][0]
    assert chained["train_time_s"] == pytest.approx(base["train_time_s"] + chained["finetune_time_s"], abs=0.02)
    assert chained["train_images"] > base["train_images"] > 0
