r"""The recipes' reports: results over seeds and the Markdown tables of the paper's form.

* :func:`summarize_seeds` -- mean and spread (sample standard deviation) over seeds.
* :func:`markdown_table` and :func:`percent` -- the one table writer and the one number
  format of every table below.
* :func:`table1_markdown` -- the paper's Table 1 over seeds (``recipes/quickstart.py``).
* :func:`interpretation_table` -- one model's row of Table 1 or, multi-label, Table 2
  (``recipes/evaluate.py``).
* :func:`fgsm_table` -- one model's row of Table 6 (``recipes/robustness.py``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "summarize_seeds",
    "percent",
    "markdown_table",
    "table1_markdown",
    "interpretation_table",
    "fgsm_table",
]


def summarize_seeds(per_seed: Sequence[Mapping[str, object]]) -> Dict[str, object]:
    """Mean and spread over seeds of every numeric entry (nested dicts, e.g. FGSM, too).

    Args:
        per_seed (sequence of dict): one result dict per seed; numeric values (``None`` for
            a value that could not be computed) and dicts of numeric values.

    Returns:
        dict: the same keys with the mean over the seeds that have a value, and ``spread``:
        the same keys with the sample standard deviation (``ddof = 1``; 0 for one seed),
        ``num_seeds`` and ``per_seed`` (the input).

    Examples::

        >>> s = summarize_seeds([{"top1": 0.5}, {"top1": 0.7}])
        >>> round(s["top1"], 3), round(s["spread"]["top1"], 3), s["num_seeds"]
        (0.6, 0.141, 2)
    """

    def reduce(values: List[object]) -> Tuple[object, object]:
        if values and all(isinstance(v, Mapping) for v in values):
            keys = list(values[0].keys())
            pairs = {k: reduce([v.get(k) for v in values]) for k in keys}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(float(v))]
        if not nums:
            return None, None
        arr = np.asarray(nums, dtype=np.float64)
        return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0

    per_seed = [dict(r) for r in per_seed]
    out: Dict[str, object] = {}
    spread: Dict[str, object] = {}
    keys: List[str] = []
    for r in per_seed:
        keys += [k for k in r if k not in keys]
    for key in keys:
        values = [r.get(key) for r in per_seed]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, (str, bool)) for v in present):
            continue  # labels and flags are not averaged (a metric None everywhere stays None)
        out[key], spread[key] = reduce(values)
    out["spread"] = spread
    out["num_seeds"] = len(per_seed)
    out["per_seed"] = per_seed
    return out


def percent(value: Optional[float], spread: Optional[float] = None, digits: int = 1) -> str:
    """A fraction in percent, ``"n/a"`` when missing, with ``± spread`` when given.

    Args:
        value (float, optional): a fraction (0.5 is 50 %); ``None`` or NaN is ``"n/a"``.
        spread (float, optional): a spread of the same scale, written after ``±``.
        digits (int): decimals.

    Returns:
        str

    Examples::

        >>> percent(0.4567), percent(0.5, 0.01, digits=2), percent(None)
        ('45.7', '50.00 ± 1.00', 'n/a')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{100.0 * value:.{digits}f}"
    if spread is not None:
        text += f" ± {100.0 * spread:.{digits}f}"
    return text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table: the header, the separator, one line per row.

    Args:
        headers (sequence of str): the column titles.
        rows (sequence of sequences): the cells of each row, as many as ``headers``
            (written with ``str``).

    Returns:
        str: the table, newline-terminated.

    Examples::

        >>> print(markdown_table(["Model", "Top-1 (%)"], [["GC", percent(0.75)]]), end="")
        | Model | Top-1 (%) |
        |---|---|
        | GC | 75.0 |
    """
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns: {row!r}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table1_markdown(
    summaries: Mapping[str, Mapping[str, object]], model: str = "ResNet", cue: bool = True
) -> str:
    """Markdown table in the form of the paper's Table 1, with the spread over seeds.

    Columns: top-1 accuracy, PG, SPG (mean over seeds of the 5-run mean, ``±`` the spread over
    seeds; the paper's within-run SPG std is its own column), CH, NQH (lower is better), with
    ``cue=True`` top-1 on cue-consistent and cue-conflicting test images, their gap and the
    Grad-CAM mass on the context cue, then the share of all-zero maps (left out of PG, SPG, CH
    and NQH). All in percent, ``mean ± spread``.

    Args:
        summaries (mapping): variant name -> :func:`summarize_seeds` output with the keys
            ``top1``, ``pg``, ``spg_mean``, ``spg_std``, ``ch``, ``nqh`` (and optionally
            ``top1_consistent``, ``top1_conflicting``, ``cue_gap``, ``cue_mass``, ``zero_maps``).
        model (str): the model's name, for the first column.
        cue (bool): include the context-cue columns (data sets with a cue).

    Returns:
        str: the table (header, separator, one row per variant), newline-terminated.

    Examples::

        >>> print(table1_markdown({"Baseline": summarize_seeds([metrics_seed0, metrics_seed1])}))
    """
    columns = [("Top-1 Acc (%)", "top1"), ("PG", "pg"), ("SPG", "spg_mean"),
               ("SPG run std", None), ("CH (%)", "ch"), ("NQH (%)", "nqh")]
    if cue:
        columns += [("Top-1 cue-consistent (%)", "top1_consistent"),
                    ("Top-1 cue-conflicting (%)", "top1_conflicting"), ("Gap (points)", "cue_gap"),
                    ("Cue mass (%)", "cue_mass")]
    columns += [("Zero maps (%)", "zero_maps")]
    rows = []
    for name, s in summaries.items():
        spread = s.get("spread", {}) or {}
        cells = [percent(s.get(key), spread.get(key)) if key else percent(s.get("spg_std"), digits=2)
                 for _, key in columns]
        rows.append([f"{model} {name}", *cells, s.get("num_seeds", 1)])
    return markdown_table(["Model", *(title for title, _ in columns), "Seeds"], rows)


def interpretation_table(name: str, metrics: Mapping[str, object], multilabel: bool) -> str:
    """A header and one row in the form of the paper's Table 1 (or Table 2 for multi-label).

    Args:
        name (str): the row's title.
        metrics (mapping): :func:`~captum_consistency.engine.evaluation.evaluate_interpretations`
            output: ``top1`` (multi-label: ``f1_per_class``, ``f1_overall``), ``pg``,
            ``spg_mean``, ``spg_std``, ``ch``, ``nqh``, fractions or ``None``.
        multilabel (bool): the F1 columns of Table 2 instead of top-1.

    Returns:
        str: the table, in percent with two decimals, newline-terminated.
    """

    def pct(key: str) -> str:
        return percent(metrics[key], digits=2)

    accuracy = (["F1-PerClass", "F1-Overall"], [pct("f1_per_class"), pct("f1_overall")]) \
        if multilabel else (["Top-1 Acc (%)"], [pct("top1")])
    headers = ["Model", *accuracy[0], "PG", "SPG", "CH (%)", "NQH (%)"]
    row = [name, *accuracy[1], pct("pg"), f"{pct('spg_mean')} ± {pct('spg_std')}", pct("ch"),
           pct("nqh")]
    return markdown_table(headers, [row])


def fgsm_table(name: str, clean: float, accuracy: Mapping[float, float]) -> str:
    """A header and one row in the form of the paper's Table 6 (top-1 under FGSM, percent).

    Args:
        name (str): the row's title.
        clean (float): top-1 without attack, a fraction.
        accuracy (mapping): epsilon (0-255 pixel levels) -> top-1 under the attack.

    Returns:
        str: the table, newline-terminated.
    """
    headers = ["Model", "clean", *(f"ε = {eps:g}" for eps in accuracy)]
    row = [name, percent(clean, digits=2), *(percent(v, digits=2) for v in accuracy.values())]
    return markdown_table(headers, [row])
