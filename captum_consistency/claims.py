r"""The paper's claims checked on results over seeds, and their Markdown.

* :func:`check_claims` -- GC against the same model without it: NQH at least 30% lower, CH and
  PG not lower, top-1 within 3 points.
* :func:`transfer_comparison` -- the same comparison per explanation method (Tables 3-4).
* :func:`audit_comparison` -- whether GC changed the model or only its Grad-CAM: the
  model-level twin of NQH (the cell-ablation share), the faithfulness of the maps and the
  randomisation check, GC against its reference.
* :data:`PAPER_TRANSFER` and :func:`paper_transfer_markdown` -- the transfer rows set against
  the paper's Tables 3 (cMWP) and 4 (FullGrad), metric by metric.
* :func:`claims_markdown`, :func:`transfer_markdown`, :func:`audit_markdown`,
  :func:`learned_markdown`, :func:`sweep_markdown` -- the report's sections built on them.

The summaries are :func:`captum_consistency.report.summarize_seeds` outputs with a display
``name``, keyed by variant (``"baseline"``, ``"gc"``, ``"gmp"``, ``"gmp_gc"``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from captum_consistency.report import markdown_table, percent

__all__ = [
    "CLAIM_PAIRS",
    "LEARNED_TOP1",
    "check_claims",
    "transfer_comparison",
    "audit_comparison",
    "RANDOMIZATION_RED_FLAG",
    "claims_markdown",
    "audit_markdown",
    "PAPER_TRANSFER",
    "paper_transfer_markdown",
    "transfer_markdown",
    "learned_markdown",
    "sweep_markdown",
]

#: ``(with GC, without GC)``: the variants the paper compares.
CLAIM_PAIRS: Tuple[Tuple[str, str], ...] = (("gc", "baseline"), ("gmp_gc", "gmp"))

#: The test top-1 below which a report says the task was not learned.
LEARNED_TOP1 = 0.90


def _relative_drop(new: float, ref: float) -> Optional[float]:
    return (ref - new) / ref if ref > 0 else None


def check_claims(summaries: Mapping[str, dict],
                 pairs: Sequence[Tuple[str, str]] = CLAIM_PAIRS) -> List[Dict[str, Any]]:
    """The paper's claims for GC, checked on the means over seeds: NQH at least 30% lower than
    without GC (the paper's ResNet-18: 24.35 -> 7.62), CH and PG not lower, top-1 within 3
    points.

    Args:
        summaries (Mapping): variant -> :func:`summarize_seeds` output (with ``nqh``, ``ch``,
            ``pg``, ``top1``).
        pairs (sequence of (str, str)): ``(with GC, without GC)`` variants to compare; pairs
            with a variant missing are left out.

    Returns:
        list of dict: per pair, ``pair``, ``comparable`` and, when comparable,
        ``nqh_relative_drop``, ``checks`` (claim -> bool) and ``all_hold``.

    Examples::

        >>> claims = check_claims({"gc": gc_summary, "baseline": baseline_summary})
        >>> claims[0]["checks"]["nqh_30pct_lower"]
    """
    claims = []
    for new, ref in pairs:
        if new not in summaries or ref not in summaries:
            continue
        a, b = summaries[new], summaries[ref]
        if any(x.get(k) is None for x in (a, b) for k in ("nqh", "ch", "pg", "top1")):
            claims.append({"pair": [new, ref], "comparable": False})
            continue
        drop = _relative_drop(a["nqh"], b["nqh"])
        checks = {
            "nqh_30pct_lower": drop is not None and drop >= 0.30,
            "ch_not_lower": a["ch"] >= b["ch"],
            "pg_not_lower": a["pg"] >= b["pg"],
            "top1_within_3_points": a["top1"] >= b["top1"] - 0.03,
        }
        claims.append({"pair": [new, ref], "comparable": True, "nqh_relative_drop": drop,
                       "checks": checks, "all_hold": all(checks.values())})
    return claims


def claims_markdown(claims: Sequence[Mapping[str, Any]], summaries: Mapping[str, dict]) -> List[str]:
    """One Markdown bullet per claim of :func:`check_claims` (the variants' ``name`` fields
    name them), plus the cue statistics where the summaries have them."""
    ok = lambda c: "**yes**" if c else "**no**"  # noqa: E731
    lines = []
    for c in claims:
        new, ref = c["pair"]
        na, nb = summaries[new]["name"], summaries[ref]["name"]
        if not c["comparable"]:
            lines.append(f"- {na} vs {nb}: not comparable (a metric is missing: every map all zero?)")
            continue
        a, b, k = summaries[new], summaries[ref], c["checks"]
        drop = c["nqh_relative_drop"]
        lines.append(
            f"- {na} vs {nb}: NQH {100 * b['nqh']:.1f} -> {100 * a['nqh']:.1f} "
            f"({'n/a' if drop is None else f'{100 * drop:.0f}%'} lower; claim >= 30%: "
            f"{ok(k['nqh_30pct_lower'])}); CH {100 * b['ch']:.1f} -> {100 * a['ch']:.1f} (not "
            f"lower: {ok(k['ch_not_lower'])}); PG {100 * b['pg']:.1f} -> {100 * a['pg']:.1f} "
            f"(not lower: {ok(k['pg_not_lower'])}); top-1 {100 * b['top1']:.1f} -> "
            f"{100 * a['top1']:.1f} (within 3 points: {ok(k['top1_within_3_points'])})")
        if a.get("cue_gap") is not None and b.get("cue_gap") is not None:
            lines.append(f"  - cue-consistent minus cue-conflicting top-1: {100 * b['cue_gap']:.1f} -> "
                         f"{100 * a['cue_gap']:.1f} points; Grad-CAM mass on the cue "
                         f"{100 * b['cue_mass']:.1f}% -> {100 * a['cue_mass']:.1f}%; conflicting "
                         f"images classified as their cue's class {100 * b['follows_cue']:.1f}% -> "
                         f"{100 * a['follows_cue']:.1f}%")
    return lines


#: The library of each registry name's prefix (names without one are this library's).
_LIBRARIES = {"captum": "Captum", "pgc": "pytorch-grad-cam"}


def transfer_comparison(summaries: Mapping[str, dict],
                        pairs: Sequence[Tuple[str, str]] = CLAIM_PAIRS) -> List[Dict[str, Any]]:
    """Per transfer method (the summaries' ``transfer`` rows, the paper's Tables 3-4), GC
    against its reference on the means over seeds.

    Returns:
        list of dict: per pair and method, ``pair``, ``method``, ``comparable`` and, when
        comparable, ``nqh_relative_drop``, ``ch_change``, ``pg_change`` (fractions),
        ``nqh_30pct_lower`` and ``ch_not_lower``.
    """
    rows = []
    for new, ref in pairs:
        a, b = summaries.get(new, {}).get("transfer"), summaries.get(ref, {}).get("transfer")
        if not a or not b:
            continue
        for method, rb in b.items():
            ra = a.get(method) or {}
            row: Dict[str, Any] = {"pair": [new, ref], "method": method}
            if any(r.get(k) is None for r in (ra, rb) for k in ("nqh", "ch", "pg")):
                rows.append(dict(row, comparable=False))
                continue
            drop = _relative_drop(ra["nqh"], rb["nqh"])
            rows.append(dict(row, comparable=True, nqh_relative_drop=drop,
                             ch_change=ra["ch"] - rb["ch"], pg_change=ra["pg"] - rb["pg"],
                             nqh_30pct_lower=drop is not None and drop >= 0.30,
                             ch_not_lower=ra["ch"] >= rb["ch"]))
    return rows


def transfer_markdown(summaries: Mapping[str, dict], comparison: Sequence[Mapping[str, Any]],
                      pairs: Sequence[Tuple[str, str]] = CLAIM_PAIRS) -> List[str]:
    """The transfer table (PG / CH / NQH per method and variant), then per pair where GC lowers
    NQH and where it does not (from :func:`transfer_comparison`), then the methods' errors and
    the warnings recorded per seed (``transfer_warnings``)."""
    with_rows = [s for s in summaries.values() if s.get("transfer")]
    if not with_rows:
        return ["(no finished run yet)"]
    rows = []
    for m in with_rows[0]["transfer"]:
        cells = []
        for s in with_rows:
            r = s["transfer"].get(m) or {}
            cells.append("error" if r.get("error") else
                         " / ".join(percent(r.get(k)) for k in ("pg", "ch", "nqh")))
        rows.append([f"`{m}`", _LIBRARIES.get(m.split(":")[0], "captum-consistency"), *cells])
    headers = ["Method", "Library", *(f"{s['name']}: PG / CH / NQH" for s in with_rows)]
    lines = markdown_table(headers, rows).splitlines()
    lines.append("")
    for new, ref in pairs:
        rows = [c for c in comparison if list(c["pair"]) == [new, ref]]
        if not rows:
            continue
        na, nb = summaries[new]["name"], summaries[ref]["name"]
        strong = [c for c in rows if c["comparable"] and c["nqh_30pct_lower"]]
        weak = [c for c in rows if c["comparable"] and not c["nqh_30pct_lower"]
                and (c["nqh_relative_drop"] or 0) > 0]
        none = [c for c in rows if c["comparable"] and (c["nqh_relative_drop"] or 0) <= 0]
        ch_lower = [c for c in rows if c["comparable"] and not c["ch_not_lower"]]
        missing = [c for c in rows if not c["comparable"]]
        name = lambda c: f"`{c['method']}` ({-100 * c['nqh_relative_drop']:+.1f}%)"  # noqa: E731
        lines.append(f"- {na} vs {nb}, NQH at least 30% lower (the paper's claim for Grad-CAM) "
                     f"under {len(strong)} of {len(rows)} methods"
                     + (": " + ", ".join(name(c) for c in strong) if strong else "") + ".")
        if weak:
            lines.append("  - lower by less than 30% under: " + ", ".join(name(c) for c in weak) + ".")
        if none:
            lines.append("  - **not lower** under: " + ", ".join(name(c) for c in none) + ".")
        lines.append("  - CH " + ("not lower under any method." if not ch_lower else
                                  "**lower** under: " + ", ".join(
                                      f"`{c['method']}` ({100 * c['ch_change']:+.1f} points)"
                                      for c in ch_lower) + "."))
        if missing:
            lines.append("  - not comparable (an error or only all-zero maps): "
                         + ", ".join(f"`{c['method']}`" for c in missing) + ".")
    errors = {(s["name"], m): r["error"] for s in with_rows for m, r in s["transfer"].items()
              if r.get("error")}
    notes = {(s["name"], w) for s in summaries.values() for r in s["per_seed"]
             for w in r.get("transfer_warnings") or []}
    if errors or notes:
        lines += ["", "What the methods said about these models:", ""]
        lines += [f"- {name}, `{m}`: error: {e}" for (name, m), e in sorted(errors.items())]
        lines += [f"- {name}: {w}" for name, w in sorted(notes)]
    return lines


def learned_markdown(summaries: Mapping[str, dict], threshold: float = LEARNED_TOP1) -> List[str]:
    """Whether the models learned the task (worst seed's top-1 at least ``threshold``), one
    bullet per variant: stated before any claim is read."""
    lines = []
    for v, s in summaries.items():
        top1 = s.get("top1")
        if top1 is None:
            continue
        worst = min((r["top1"] for r in s["per_seed"] if r.get("top1") is not None), default=top1)
        verdict = ("learned" if worst >= threshold else
                   f"**not learned** (below {100 * threshold:.0f}%: the comparison below "
                   "says little about the method)")
        lines.append(f"- {s['name']}: test top-1 {100 * top1:.1f}% (worst seed "
                     f"{100 * worst:.1f}%): {verdict}")
    return lines


def sweep_markdown(points: Sequence[Mapping[str, Any]]) -> List[str]:
    """The lambda sweep's table: one row per point (``lam``, ``source`` and the metrics)."""
    keys = ("top1", "pg", "ch", "nqh", "zero_maps")
    rows = [[f"{p['lam']:g}", p["source"], *(percent(p[k]) for k in keys)] for p in points]
    headers = ["lambda", "trained as", "Top-1 (%)", "PG", "CH (%)", "NQH (%)", "Zero maps (%)"]
    return markdown_table(headers, rows).splitlines()


#: A mean Spearman correlation above which a map "survives" the re-initialisation of the
#: Grad-CAM layer and everything above it (Adebayo et al., 2018): a red flag.
RANDOMIZATION_RED_FLAG = 0.5


def _survives(randomization: Mapping[str, Optional[float]], layer: str) -> Optional[bool]:
    """Whether the correlation is still above :data:`RANDOMIZATION_RED_FLAG` once ``layer`` and
    every block above it are re-initialised (``None`` without that step)."""
    value = randomization.get(layer) if randomization else None
    return None if value is None else value > RANDOMIZATION_RED_FLAG


def audit_comparison(summaries: Mapping[str, dict], layer: str = "layer4",
                     pairs: Sequence[Tuple[str, str]] = CLAIM_PAIRS) -> List[Dict[str, Any]]:
    """Per pair, whether GC changed what the model uses or only its Grad-CAM (the summaries'
    ``audit`` entries, :func:`captum_consistency.engine.audit_model`, means over seeds).

    The reading, stated in ``reading``:

    * ``"model"`` -- NQH is at least 30% lower *and* the cell-ablation share (the same question
      asked of the model's output) is at least 30% lower too: the claim holds at the level of
      the model;
    * ``"partly"`` -- NQH is 30% lower, the ablation share lower but by less than 30%: GC moved
      the explanation more than the model;
    * ``"map only"`` -- NQH is 30% lower and the ablation share is not lower: GC moved the
      explanation, not what the model uses;
    * ``"no claim"`` -- NQH is not 30% lower (nothing to explain).

    Returns:
        list of dict: ``pair``, ``comparable`` and, when comparable, ``nqh_relative_drop``,
        ``share_relative_drop``, ``share_blur_relative_drop``, ``own_cell_predicted`` (GC,
        reference), ``deletion_gain`` (Grad-CAM minus random maps; GC, reference),
        ``survives_randomization`` (GC, reference), ``reading`` (from the cells replaced by
        zeros, the reports' replacement) and ``reading_blur`` (the same from blurred cells, a
        check that the reading does not hang on the replacement).
    """
    rows = []
    for new, ref in pairs:
        if new not in summaries or ref not in summaries:
            continue
        a, b = summaries[new], summaries[ref]
        aa, ab = a.get("audit") or {}, b.get("audit") or {}
        row: Dict[str, Any] = {"pair": [new, ref]}
        if any(x.get(k) is None for x in (aa, ab) for k in ("ablation_share",)) or \
                a.get("nqh") is None or b.get("nqh") is None:
            rows.append(dict(row, comparable=False))
            continue
        nqh_drop = _relative_drop(a["nqh"], b["nqh"])
        share_drop = _relative_drop(aa["ablation_share"], ab["ablation_share"])
        blur_drop = (_relative_drop(aa["ablation_share_blur"], ab["ablation_share_blur"])
                     if aa.get("ablation_share_blur") is not None
                     and ab.get("ablation_share_blur") is not None else None)
        def read(drop: Optional[float]) -> str:
            if nqh_drop is None or nqh_drop < 0.30:
                return "no claim"
            if drop is not None and drop >= 0.30:
                return "model"
            if drop is not None and drop > 0:
                return "partly"
            return "map only"

        reading = read(share_drop)
        gain = lambda x: (None if x.get("deletion_gradcam") is None or x.get("deletion_random") is None  # noqa: E731
                          else x["deletion_gradcam"] - x["deletion_random"])
        rows.append(dict(
            row, comparable=True, nqh_relative_drop=nqh_drop, share_relative_drop=share_drop,
            share_blur_relative_drop=blur_drop,
            own_cell_predicted=[aa.get("own_cell_predicted"), ab.get("own_cell_predicted")],
            deletion_gain=[gain(aa), gain(ab)],
            survives_randomization=[_survives(aa.get("randomization"), layer),
                                    _survives(ab.get("randomization"), layer)],
            reading=reading, reading_blur=None if blur_drop is None else read(blur_drop)))
    return rows


_READINGS = {
    "model": "the claim is **supported at the level of the model**: the distractor cells carry "
             "less of the class's evidence in the model's output, not only in its map",
    "partly": "GC **moved the explanation more than the model**: the distractor cells' share of "
              "the class's evidence in the output falls by less than 30%",
    "map only": "GC **moved the explanation, not the model**: the distractor cells carry as much "
                "of the class's evidence in the output as without GC",
    "no claim": "NQH is not 30% lower, so there is no explanation change to audit",
}


def _fmt(mean: Optional[float], spread: Optional[float], digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread else "")


def audit_markdown(summaries: Mapping[str, dict], comparison: Sequence[Mapping[str, Any]],
                   layer: str = "layer4") -> List[str]:
    """The report's section "Did the model change, or only its map?": the model-level table,
    the faithfulness and randomisation tables (means ± standard deviation over seeds), then one
    reading per pair of :func:`audit_comparison`."""
    with_audit = [s for s in summaries.values() if s.get("audit")]
    if not with_audit:
        return ["(no audited run yet)"]
    pct = lambda s, k: percent(s["audit"].get(k), (s["spread"].get("audit") or {}).get(k))  # noqa: E731
    rows = [[s["name"], percent(s.get("nqh"), s["spread"].get("nqh")), pct(s, "ablation_share"),
             pct(s, "ablation_share_blur"), pct(s, "own_cell_probability"),
             pct(s, "own_cell_predicted"), str(round(sum(r["audit"]["ablation_undefined"]
                                                       for r in s["per_seed"] if r.get("audit"))))]
            for s in with_audit]
    lines = markdown_table(
        ["Model", "NQH (%)", "Ablation share (%)", "Ablation share, blur (%)",
         "P(class) own cell removed (%)", "Still predicted (%)", "Undefined (all seeds)"],
        rows).splitlines()
    num = lambda s, k: _fmt(s["audit"].get(k), (s["spread"].get("audit") or {}).get(k), 3)  # noqa: E731
    rows = [[s["name"], num(s, "deletion_gradcam"), num(s, "deletion_random"),
             num(s, "road_gradcam"), num(s, "road_random")] for s in with_audit]
    lines += ["", *markdown_table(
        ["Model", "Deletion LeRF-MoRF, Grad-CAM", "same, random maps", "ROAD, Grad-CAM",
         "ROAD, random maps"], rows).splitlines()]
    blocks = list((with_audit[0]["audit"].get("randomization") or {}).keys())
    if blocks:
        rows = []
        for s in with_audit:
            r = s["audit"].get("randomization") or {}
            sd = (s["spread"].get("audit") or {}).get("randomization") or {}
            rows.append([s["name"], *(_fmt(r.get(b), sd.get(b)) for b in blocks)])
        lines += ["", "Spearman correlation of the element-wise Grad-CAM with the map of the same "
                  "model re-initialised from the top down to (and including) each block:", "",
                  *markdown_table(["Model", *(f"`{b}`" for b in blocks)], rows).splitlines()]
    lines.append("")
    for c in comparison:
        new, ref = c["pair"]
        na, nb = summaries[new]["name"], summaries[ref]["name"]
        if not c["comparable"]:
            lines.append(f"- {na} vs {nb}: not comparable (a measure is missing)")
            continue
        drop = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        lines.append(
            f"- {na} vs {nb}: NQH {drop(c['nqh_relative_drop'])} lower, cell-ablation share "
            f"{drop(c['share_relative_drop'])} lower (blurred cells: "
            f"{drop(c['share_blur_relative_drop'])}): {_READINGS[c['reading']]}.")
        if c.get("reading_blur") not in (None, c["reading"]):
            lines.append(f"  - with the cells blurred instead of emptied, the reading differs: "
                         f"{_READINGS[c['reading_blur']]}.")
        flags = [n for n, f in zip((na, nb), c["survives_randomization"]) if f]
        lines.append("  - randomisation: " + (
            f"**red flag** for {', '.join(flags)}: the map still correlates above "
            f"{RANDOMIZATION_RED_FLAG} with `{layer}` and everything above it re-initialised."
            if flags else f"no map survives the re-initialisation of `{layer}` and above "
            f"(correlation at most {RANDOMIZATION_RED_FLAG})."))
        ga, gb = c["deletion_gain"]
        if ga is not None and gb is not None:
            lines.append(f"  - faithfulness: deletion LeRF-MoRF above random maps by {ga:.3f} "
                         f"({na}) and {gb:.3f} ({nb}): the maps of both "
                         + ("mark pixels the model needs." if ga > 0 and gb > 0 else
                            "are **not** better than random for at least one model."))
    return lines


#: The paper's Tables 3 (cMWP) and 4 (FullGrad), MS-COCO validation set, ResNet18, in percent:
#: method -> variant -> (PG, SPG, CH, NQH).
PAPER_TRANSFER: Dict[str, Dict[str, Tuple[float, float, float, float]]] = {
    "cmwp": {"baseline": (63.30, 45.68, 32.23, 74.89), "gc": (65.60, 48.54, 34.44, 74.90)},
    "fullgrad": {"baseline": (59.90, 18.99, 13.38, 73.83), "gc": (64.90, 19.46, 13.71, 73.46)},
}

_PAPER_TABLE = {"cmwp": "Table 3", "fullgrad": "Table 4"}


def paper_transfer_markdown(summaries: Mapping[str, dict], new: str = "gc",
                            ref: str = "baseline") -> List[str]:
    """The transfer rows of cMWP and FullGrad set against the paper's Tables 3 and 4, metric by
    metric: for each of PG, SPG, CH and NQH, the paper's change from Baseline to GC and this
    run's (means over seeds), whether GC is better (higher PG, SPG, CH; lower NQH) in each, and
    whether the two agree: the same sign, or both within 1 point of no change ("flat").
    ``[]`` without both variants' rows."""
    a = (summaries.get(new) or {}).get("transfer") or {}
    b = (summaries.get(ref) or {}).get("transfer") or {}

    def verdict(delta: float, lower_is_better: bool) -> str:
        better = delta < 0 if lower_is_better else delta > 0
        return ("better" if better else "worse") + (", within 1 point" if abs(delta) < 1 else "")

    rows = []
    for method, paper in PAPER_TRANSFER.items():
        ra, rb = a.get(method) or {}, b.get(method) or {}
        for i, (key, label) in enumerate((("pg", "PG"), ("spg_mean", "SPG"), ("ch", "CH (%)"),
                                          ("nqh", "NQH (%)"))):
            low = key == "nqh"
            pb, pa = paper["baseline"][i], paper["gc"][i]
            ob, oa = rb.get(key), ra.get(key)
            if ob is None or oa is None:
                ours, agree = "n/a", "n/a"
            else:
                ob, oa = 100 * ob, 100 * oa
                ours = f"{ob:.1f} -> {oa:.1f} ({oa - ob:+.1f}; GC {verdict(oa - ob, low)})"
                if abs(oa - ob) < 1 and abs(pa - pb) < 1:
                    agree = "yes (flat in both)"
                elif (oa - ob > 0) == (pa - pb > 0):
                    agree = "yes"
                else:
                    agree = "**no**"
            rows.append([f"`{method}` ({_PAPER_TABLE[method]})", label,
                         f"{pb:.2f} -> {pa:.2f} ({pa - pb:+.2f}; GC {verdict(pa - pb, low)})",
                         ours, agree])
    if not any(r[3] != "n/a" for r in rows):
        return []
    return markdown_table(["Method", "Metric", "Paper: Baseline -> GC (MS-COCO, ResNet18)",
                           "This run: Baseline -> GC", "Agrees"], rows).splitlines()
