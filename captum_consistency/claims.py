r"""The paper's claims checked on results over seeds, and their Markdown.

* :func:`check_claims` -- GC against the same model without it: NQH at least 30% lower, CH and
  PG not lower, top-1 within 3 points.
* :func:`transfer_comparison` -- the same comparison per explanation method (Tables 3-4).
* :func:`claims_markdown`, :func:`transfer_markdown`, :func:`learned_markdown`,
  :func:`sweep_markdown` -- the report's sections built on them.

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
    "claims_markdown",
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
