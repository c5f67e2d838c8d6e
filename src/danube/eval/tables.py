"""The report's results tables: published rows, and Markdown tables with a new model beside them.

The published numbers are copied from the H2O-Danube-1.8B technical report
(arXiv:2401.16818) exactly as printed, leading zeros included. Tables 1 and 4 share a
layout (commonsense / world knowledge / reading comprehension), as do 2, 5 and 6
(Open LLM Leaderboard); Table 3 is MT-Bench per category and turn.
"""

from __future__ import annotations

from dataclasses import dataclass

# Column headers as the report prints them; each suite entry names its column.
TABLE1_COLUMNS = ["ARC-e acc_n", "ARC-c acc_n", "Bool acc", "HS acc_n", "OB acc_n", "PIQA acc_n", "Triv em", "Wino acc"]
TABLE2_COLUMNS = ["ARC 25-shot", "HS 10-shot", "MMLU 5-shot", "TQA 0-shot", "Wino 5-shot", "GSM 5-shot"]

# model, size, tokens, then TABLE1_COLUMNS. A blank model repeats the row above's (the
# report lists OPT, Cerebras and Pythia at two sizes).
_TABLE1 = """
TinyLlama	1.1B	3.00T	55.35	30.12	57.80	59.18	36.00	73.18	28.78	58.88
Falcon	1.3B	0.35T	57.32	32.00	62.84	61.52	35.20	74.65	27.27	60.77
OPT	1.3B	0.18T	50.93	29.52	57.71	53.73	33.40	72.52	15.67	59.59
	2.7B	0.18T	54.34	31.31	60.31	60.61	35.20	74.81	22.38	60.85
Cerebras	1.3B	0.03T	45.88	25.26	59.36	38.37	29.20	66.76	05.49	52.01
	2.7B	0.05T	52.53	27.30	59.20	48.84	32.00	70.89	12.41	55.96
Pythia	1.4B	0.30T	56.57	29.86	56.76	54.40	33.20	72.36	18.46	56.20
	2.8B	0.30T	58.96	32.68	64.19	59.45	35.60	73.78	24.39	58.17
Qwen*	1.8B	2.20T	58.25	34.98	67.13	58.82	33.40	72.85	23.92	58.96
Stable LM 2*	1.6B	4.00T	67.63	39.08	75.60	68.78	40.00	76.39	33.84	63.30
H2O-Danube	1.8B	1.00T	62.29	35.84	65.81	68.20	37.60	76.93	38.99	61.96
"""

# model, size, TABLE2_COLUMNS, average, average without GSM8k.
_TABLE2 = """
TinyLlama	1.1B	33.87	60.31	26.04	37.32	59.51	01.44	36.42	43.41
Falcon	1.3B	35.07	63.56	25.28	35.96	62.04	00.53	37.07	44.38
OPT	1.3B	29.52	54.53	24.96	38.71	59.75	00.15	34.60	41.49
	2.7B	33.96	61.43	25.43	37.43	61.96	00.23	36.74	44.04
Cerebras	1.3B	26.28	38.54	26.59	42.70	53.43	00.23	31.30	37.51
	2.7B	29.10	49.29	25.17	41.37	54.14	00.45	33.25	39.81
Pythia	1.4B	32.68	54.96	25.56	38.66	57.30	00.83	35.00	41.83
	2.8B	36.26	60.66	26.78	35.56	60.22	00.83	36.72	43.90
Qwen*	1.8B	37.71	58.87	46.37	39.41	61.72	24.41	44.75	48.82
Stable LM 2*	1.6B	43.52	70.45	39.08	36.81	65.82	17.36	45.51	51.14
H2O-Danube	1.8B	39.68	69.75	25.97	33.63	64.17	02.05	39.21	46.64
"""

# Table 4 (chat models, Table 1 layout; the report gives no token counts).
_TABLE4 = """
TinyLlama-1.1B-Chat	1.1B		54.34	33.36	60.83	60.39	37.20	74.59	29.04	59.91
Qwen-1.8B-Chat	1.8B		49.28	32.94	67.74	54.73	34.60	71.82	19.04	59.43
Stablelm-2-Zephyr-1.6B	1.6B		60.35	39.25	80.18	68.85	39.60	74.92	31.46	64.48
H2O-Danube-1.8B-Chat	1.8B		67.51	39.25	77.89	67.60	39.20	76.71	36.29	65.35
"""

# Table 5 (chat models) and Table 6 (Danube2), Table 2 layout with a single average.
_TABLE5 = """
TinyLlama-1.1B-Chat	1.1B	36.01	61.05	25.04	37.86	60.77	02.35	37.18
Qwen-1.8B-Chat	1.8B	36.95	54.34	44.55	43.70	58.88	19.26	42.94
Stablelm-2-Zephyr-1.6B	1.6B	43.69	69.34	41.85	45.21	64.09	35.18	49.89
H2O-Danube-1.8B-Chat	1.8B	41.47	68.02	33.49	40.82	64.40	15.54	43.96
"""

_TABLE6 = """
Stable LM 2	1.6B	43.34	70.45	38.95	36.78	64.56	17.44	45.25
Gemma-2B	2.5B	48.46	71.65	41.68	33.13	66.77	17.36	46.51
Qwen1.5	1.8B	37.88	61.42	46.71	39.43	60.30	33.59	46.55
Phi-1.5	1.3B	52.90	63.79	43.89	40.89	72.22	12.43	47.69
H2O-Danube	1.8B	39.42	69.58	25.94	33.86	64.48	01.44	39.12
H2O-Danube2	1.8B	43.34	72.95	40.20	38.01	68.03	29.80	48.72
"""

# Table 3: MT-Bench (GPT-4 judge, coding excluded); category -> score per model, per turn.
MT_BENCH_MODELS = ["TinyLlama-1.1B-Chat", "Qwen-1.8B-Chat", "Stablelm-2-Zephyr-1.6B", "H2O-Danube-1.8B-Chat"]
_TABLE3 = """
1	Extraction	2.50	4.70	5.20	3.40
1	Humanities	8.15	6.60	9.20	8.90
1	Math	1.20	2.40	3.50	3.80
1	Reasoning	3.10	3.50	3.50	4.30
1	Roleplay	5.60	6.70	6.80	7.05
1	STEM	6.60	6.50	7.35	8.10
1	Writing	8.65	9.20	9.35	9.35
1	Average	5.11	5.66	6.41	6.41
2	Extraction	1.20	2.40	4.80	3.20
2	Humanities	8.10	7.30	9.70	8.90
2	Math	1.40	1.60	1.60	1.50
2	Reasoning	2.30	3.90	3.20	2.70
2	Roleplay	5.60	6.70	6.95	6.90
2	STEM	4.60	5.80	6.80	6.10
2	Writing	2.70	4.80	7.50	3.10
2	Average	3.70	4.64	5.79	4.63
"""


@dataclass(frozen=True)
class Row:
    model: str
    size: str
    tokens: str  # "" where the table has no tokens column
    scores: tuple[str, ...]  # as printed


def _parse(block: str, has_tokens: bool) -> list[Row]:
    rows: list[Row] = []
    for line in block.strip("\n").splitlines():
        cells = line.split("\t")
        model = cells[0] or rows[-1].model
        if has_tokens:
            rows.append(Row(model, cells[1], cells[2], tuple(cells[3:])))
        else:
            rows.append(Row(model, cells[1], "", tuple(cells[2:])))
    return rows


# name -> (title, layout, rows); layout "table1" or "table2" decides the columns.
REFERENCES: dict[str, tuple[str, str, list[Row]]] = {
    "table1": ("Table 1: base models, commonsense reasoning / world knowledge / reading comprehension", "table1", _parse(_TABLE1, True)),
    "table2": ("Table 2: base models, Open LLM Leaderboard", "table2", _parse(_TABLE2, False)),
    "table4": ("Table 4: chat models, commonsense reasoning / world knowledge / reading comprehension", "table1", _parse(_TABLE4, True)),
    "table5": ("Table 5: chat models, Open LLM Leaderboard", "table2", _parse(_TABLE5, False)),
    "table6": ("Table 6: H2O-Danube2 Open LLM Leaderboard", "table2", _parse(_TABLE6, False)),
}


def mt_bench_reference() -> dict[int, dict[str, list[str]]]:
    """Table 3: ``{turn: {category: [score per MT_BENCH_MODELS]}}`` (Average included)."""
    out: dict[int, dict[str, list[str]]] = {1: {}, 2: {}}
    for line in _TABLE3.strip("\n").splitlines():
        turn, category, *scores = line.split("\t")
        out[int(turn)][category] = scores
    return out


def fmt(x: float | None) -> str:
    """Percent with two decimals, as the report prints (``05.49`` style padding for < 10)."""
    return "—" if x is None else f"{x:05.2f}"


def _markdown(header: list[str], rows: list[list[str]], align_from: int) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < align_from else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def benchmark_table(
    layout: str,
    ours: dict[str, float | None],
    model: str,
    size: str = "",
    tokens: str = "",
    reference: str | None = None,
) -> str:
    """A Markdown table in the layout of Table 1 (``table1``) or Table 2 (``table2``).

    ``ours`` maps column names to scores in percent (``None`` where not run). The
    reference rows, when ``reference`` names a report table of the same layout, come
    first, the evaluated model last.
    """
    ref_rows: list[Row] = []
    title = None
    if reference:
        if reference not in REFERENCES:
            raise ValueError(f"reference={reference!r}; choose one of {sorted(REFERENCES)}")
        title, ref_layout, ref_rows = REFERENCES[reference]
        if ref_layout != layout:
            raise ValueError(f"reference {reference} has the {ref_layout} layout, this suite's table is {layout}")
    if layout == "table1":
        header = ["Model", "Size", "Tokens"] + TABLE1_COLUMNS
        rows = [[r.model, r.size, r.tokens or "—", *r.scores] for r in ref_rows]
        rows.append([model, size or "—", tokens or "—"] + [fmt(ours.get(c)) for c in TABLE1_COLUMNS])
        align = 3
    elif layout == "table2":
        n_avg = max((len(r.scores) - len(TABLE2_COLUMNS) for r in ref_rows), default=2)
        header = ["Model", "Size"] + TABLE2_COLUMNS + ["Average", "Average no GSM"][: max(n_avg, 1)]
        rows = [[r.model, r.size, *r.scores] for r in ref_rows]
        values = [ours.get(c) for c in TABLE2_COLUMNS]
        done = [v for v in values if v is not None]
        avg = sum(done) / len(done) if len(done) == len(values) else None
        no_gsm = [v for c, v in zip(TABLE2_COLUMNS, values) if c != "GSM 5-shot"]
        avg_no_gsm = sum(no_gsm) / len(no_gsm) if None not in no_gsm else None
        rows.append([model, size or "—"] + [fmt(v) for v in values] + [fmt(avg), fmt(avg_no_gsm)][: max(n_avg, 1)])
        align = 2
    else:
        raise ValueError(f"unknown table layout {layout!r}; use table1 or table2")
    caption = f"Reference rows: {title} of the H2O-Danube-1.8B report.\n\n" if title else ""
    return caption + _markdown(header, rows, align) + "\n"


def mt_bench_table(scores: dict[int, dict[str, float]], model: str, reference: bool = True) -> str:
    """Table 3 layout: category rows per turn, one column per model (report's models first).

    ``scores`` is ``{turn: {category: mean score}}`` with categories as FastChat names
    them (lower case, e.g. ``stem``); the average is over the categories present.
    """
    ref = mt_bench_reference() if reference else {1: {}, 2: {}}
    models = (MT_BENCH_MODELS if reference else []) + [model]
    names = {c.lower(): c for c in ["Extraction", "Humanities", "Math", "Reasoning", "Roleplay", "STEM", "Writing", "Coding"]}
    rows = []
    for turn in (1, 2):
        rows.append([f"**Turn {turn}**"] + [""] * len(models))
        ours = scores.get(turn, {})
        cats = sorted(set(names.get(c.lower(), c) for c in ours) | ({k for k in ref[turn] if k != "Average"}))
        for cat in cats:
            mine = next((v for c, v in ours.items() if names.get(c.lower(), c) == cat), None)
            rows.append([cat] + ref[turn].get(cat, [""] * len(models[:-1])) + [f"{mine:.2f}" if mine is not None else "—"])
        avg = sum(ours.values()) / len(ours) if ours else None
        rows.append(["Average"] + ref[turn].get("Average", []) + [f"{avg:.2f}" if avg is not None else "—"])
    caption = "Reference columns: Table 3 (MT-Bench, coding excluded) of the H2O-Danube-1.8B report.\n\n" if reference else ""
    return caption + _markdown([""] + models, rows, 1) + "\n"
