"""captum_consistency.claims against hand-computed comparisons."""

import math

import pytest

from captum_consistency.claims import (
    check_claims,
    claims_markdown,
    learned_markdown,
    transfer_comparison,
    transfer_markdown,
)


def _summary(name, nqh, ch, pg, top1, transfer=None, per_seed=None):
    return {"name": name, "nqh": nqh, "ch": ch, "pg": pg, "top1": top1,
            "transfer": transfer or {}, "per_seed": per_seed or [{"top1": top1}]}


def test_check_claims_by_hand():
    summaries = {
        "baseline": _summary("Baseline", nqh=0.40, ch=0.20, pg=0.70, top1=0.95),
        "gc": _summary("GC", nqh=0.30, ch=0.21, pg=0.69, top1=0.93),
    }
    (claim,) = check_claims(summaries)  # no GMP variants: one pair
    assert claim["pair"] == ["gc", "baseline"] and claim["comparable"]
    assert math.isclose(claim["nqh_relative_drop"], 0.25)
    assert claim["checks"] == {"nqh_30pct_lower": False, "ch_not_lower": True,
                               "pg_not_lower": False, "top1_within_3_points": True}
    assert claim["all_hold"] is False
    (line,) = claims_markdown([claim], summaries)
    assert line.startswith("- GC vs Baseline: NQH 40.0 -> 30.0 (25% lower; claim >= 30%: **no**)")


def test_a_missing_metric_is_not_comparable():
    summaries = {"gmp": _summary("GMP", 0.4, 0.2, 0.7, 0.9),
                 "gmp_gc": _summary("GMP + GC", None, None, None, 0.9)}
    assert check_claims(summaries) == [{"pair": ["gmp_gc", "gmp"], "comparable": False}]
    assert "not comparable" in claims_markdown(check_claims(summaries), summaries)[0]


def test_transfer_comparison_and_markdown_by_hand():
    base = {"m1": {"pg": 0.5, "ch": 0.2, "nqh": 0.50}, "m2": {"pg": 0.5, "ch": 0.3, "nqh": 0.40},
            "pgc:x": {"error": "RuntimeError: no"}}
    gc = {"m1": {"pg": 0.6, "ch": 0.25, "nqh": 0.25}, "m2": {"pg": 0.5, "ch": 0.2, "nqh": 0.44},
          "pgc:x": {"error": "RuntimeError: no"}}
    summaries = {"baseline": _summary("Baseline", 0.4, 0.2, 0.7, 0.9, base),
                 "gc": _summary("GC", 0.3, 0.2, 0.7, 0.9, gc,
                                per_seed=[{"top1": 0.9, "transfer_warnings": ["m2: a warning"]}])}
    rows = {r["method"]: r for r in transfer_comparison(summaries)}
    assert math.isclose(rows["m1"]["nqh_relative_drop"], 0.5) and rows["m1"]["nqh_30pct_lower"]
    assert math.isclose(rows["m2"]["nqh_relative_drop"], -0.1) and not rows["m2"]["ch_not_lower"]
    assert math.isclose(rows["m2"]["ch_change"], -0.1)
    assert rows["pgc:x"] == {"pair": ["gc", "baseline"], "method": "pgc:x", "comparable": False}
    text = "\n".join(transfer_markdown(summaries, list(rows.values())))
    assert "| `m1` | captum-consistency | 50.0 / 20.0 / 50.0 | 60.0 / 25.0 / 25.0 |" in text
    assert "| `pgc:x` | pytorch-grad-cam | error | error |" in text
    assert "under 1 of 3 methods: `m1` (-50.0%)" in text
    assert "**not lower** under: `m2` (+10.0%)" in text
    assert "CH **lower** under: `m2` (-10.0 points)" in text
    assert "- GC: m2: a warning" in text and "- Baseline, `pgc:x`: error: RuntimeError: no" in text


@pytest.mark.parametrize("worst, verdict", [(0.95, "learned"), (0.85, "**not learned**")])
def test_learned_markdown_reads_the_worst_seed(worst, verdict):
    s = _summary("Baseline", 0.4, 0.2, 0.7, 0.95, per_seed=[{"top1": 0.99}, {"top1": worst}])
    (line,) = learned_markdown({"baseline": s})
    assert f"worst seed {100 * worst:.1f}%): {verdict}" in line
