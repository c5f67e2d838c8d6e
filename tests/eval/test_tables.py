"""The report's published rows are transcribed consistently, and tables render in its layout."""

import pytest

from danube.eval.tables import REFERENCES, TABLE1_COLUMNS, TABLE2_COLUMNS, benchmark_table, mt_bench_reference


@pytest.mark.parametrize("name", ["table2", "table5", "table6"])
def test_leaderboard_averages_match_the_printed_scores(name):
    # A mistyped score would break the printed average (the report rounds to 2 decimals).
    for row in REFERENCES[name][2]:
        scores = [float(s) for s in row.scores]
        assert abs(sum(scores[:6]) / 6 - scores[6]) < 0.011, row
        if len(scores) == 8:  # Table 2 also prints the average without GSM8k
            assert abs(sum(scores[:5]) / 5 - scores[7]) < 0.011, row


def test_mt_bench_averages_match_the_printed_categories():
    ref = mt_bench_reference()
    for turn in (1, 2):
        cats = [c for c in ref[turn] if c != "Average"]
        assert len(cats) == 7
        for m in range(4):
            assert abs(sum(float(ref[turn][c][m]) for c in cats) / 7 - float(ref[turn]["Average"][m])) < 0.011


def test_table_layouts():
    t1 = benchmark_table("table1", {c: 50.0 for c in TABLE1_COLUMNS}, "mine", "1.8B", "1.00T", reference="table1")
    assert t1.splitlines()[2].startswith("| Model | Size | Tokens | ARC-e acc_n |")
    assert "| Cerebras | 2.7B | 0.05T | 52.53 |" in t1 and t1.strip().endswith("| mine | 1.8B | 1.00T" + " | 50.00" * 8 + " |")
    t2 = benchmark_table("table2", dict(zip(TABLE2_COLUMNS, [40.0, 70.0, 26.0, 34.0, 64.0, 2.0])), "mine", "1.8B", reference="table2")
    assert t2.strip().endswith("| mine | 1.8B | 40.00 | 70.00 | 26.00 | 34.00 | 64.00 | 02.00 | 39.33 | 46.80 |")
    with pytest.raises(ValueError, match="layout"):
        benchmark_table("table2", {}, "mine", reference="table1")
