"""captum_consistency.report: the one table writer and number format behind every recipe's table."""

import math

import pytest

from captum_consistency.report import fgsm_table, interpretation_table, markdown_table, percent


def test_percent_formats_missing_and_spread():
    assert percent(0.4567) == "45.7"
    assert percent(0.5, 0.01, digits=2) == "50.00 ± 1.00"
    assert percent(None) == percent(math.nan) == "n/a"
    assert percent(1, digits=2) == "100.00"


def test_markdown_table_lines_and_cell_count():
    assert markdown_table(["A", "B"], [["x", 1], ["y", 2.5]]) == (
        "| A | B |\n|---|---|\n| x | 1 |\n| y | 2.5 |\n")
    assert markdown_table(["A"], []) == "| A |\n|---|\n"
    with pytest.raises(ValueError, match="2 cells for 1 columns"):
        markdown_table(["A"], [["x", "y"]])


def test_interpretation_table_rows_of_table_1_and_2():
    metrics = {"top1": 0.5123, "f1_per_class": 0.3, "f1_overall": None, "pg": math.nan,
               "spg_mean": 0.25, "spg_std": 0.0123, "ch": 0.4, "nqh": 1}
    assert interpretation_table("R18 (gc)", metrics, multilabel=False) == (
        "| Model | Top-1 Acc (%) | PG | SPG | CH (%) | NQH (%) |\n"
        "|---|---|---|---|---|---|\n"
        "| R18 (gc) | 51.23 | n/a | 25.00 ± 1.23 | 40.00 | 100.00 |\n")
    assert interpretation_table("R18 (gc)", metrics, multilabel=True) == (
        "| Model | F1-PerClass | F1-Overall | PG | SPG | CH (%) | NQH (%) |\n"
        "|---|---|---|---|---|---|---|\n"
        "| R18 (gc) | 30.00 | n/a | n/a | 25.00 ± 1.23 | 40.00 | 100.00 |\n")


def test_fgsm_table_row_of_table_6():
    assert fgsm_table("R50 GMP", 0.75, {1.0: 0.5, 2.0: 0.25, 8.5: 0.125}) == (
        "| Model | clean | ε = 1 | ε = 2 | ε = 8.5 |\n"
        "|---|---|---|---|---|\n"
        "| R50 GMP | 75.00 | 50.00 | 25.00 | 12.50 |\n")
