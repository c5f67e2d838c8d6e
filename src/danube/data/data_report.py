"""``danube data-report RUN_DIR``: what a pretraining run read of each source, once, twice, never.

Read from what the run directory records (:class:`danube.data.pretrain.StepRecord`): the
walk's state at the newest checkpoint of the latest stage (``<stage>/data/positions.jsonl``)
gives, per source, every epoch's lane cursors, hence how many times each token was read;
the per-step rows (``<stage>/data/steps.jsonl``) give the tokens each stage read, and must
add up to the same totals (a check of the record itself).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from danube.data.order import coverage
from danube.data.pretrain import StepRecord, read_rows


def stage_names(run_dir: Path) -> list[str]:
    """The recipe's stages in order (from the run's ``config.yaml``), else the stage folders that hold records."""
    config = run_dir / "config.yaml"
    if config.is_file():
        recorded = yaml.safe_load(config.read_text()) or {}
        stages = ((recorded.get("recipe") or {}).get("stages")) or []
        names = [str(s["name"]) for s in stages if isinstance(s, dict) and "name" in s]
        if names:
            return names
    return sorted(p.parent.parent.name for p in run_dir.glob(f"*/data/{StepRecord.POSITIONS}"))


def data_report(run_dir: str | Path) -> dict[str, Any]:
    """Per source: tokens, epochs, tokens read 0, 1, 2, ... times; per stage: steps and tokens read per source."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    stages = []
    last: dict[str, Any] | None = None
    for name in stage_names(run_dir):
        folder = run_dir / name / "data"
        positions = read_rows(folder / StepRecord.POSITIONS)
        steps = read_rows(folder / StepRecord.STEPS)
        if not positions and not steps:
            continue
        tokens: dict[str, int] = {}
        for row in steps:
            for source, (n, _crc) in row["sources"].items():
                tokens[source] = tokens.get(source, 0) + int(n)
        stages.append({"stage": name, "steps": max((r["step"] for r in steps), default=0), "tokens": tokens})
        if positions:
            last = {"stage": name, **positions[-1]}
    if last is None:
        raise ValueError(f"{run_dir} records no data position (no <stage>/data/{StepRecord.POSITIONS}): not a "
                         "pretraining run directory, or one made before danube recorded its walk through the data")
    state = last["order"]
    sources = {}
    for name, s in state["sources"].items():
        counts = coverage(state, name)
        stepped = sum(st["tokens"].get(name, 0) for st in stages)
        sources[name] = {
            "tokens": s["tokens"], "epochs_begun": s["epoch"] + 1, "read": s["read"], "skipped": s["skipped"],
            "times_read": [int(c) for c in counts],  # tokens read 0, 1, 2, ... times
            "steps_agree": stepped == s["read"],
        }
    return {"run_dir": str(run_dir), "seed": state["seed"], "at": {"stage": last["stage"], "step": last["step"]},
            "sources": sources, "stages": stages}


def format_report(report: dict[str, Any]) -> str:
    at = report["at"]
    lines = [f"{report['run_dir']}: the walk at stage {at['stage']} step {at['step']} (seed {report['seed']})", ""]
    most = max(len(s["times_read"]) for s in report["sources"].values())
    times = ["never", "once", "twice"] + [f"{k}x" for k in range(3, most)]
    header = ["source", "tokens", "epochs", *times[:most], "skipped"]
    rows = []
    for name, s in report["sources"].items():
        counts = s["times_read"] + [0] * (most - len(s["times_read"]))
        rows.append([name, f"{s['tokens']:,}", str(s["epochs_begun"]), *(f"{c:,}" for c in counts), f"{s['skipped']:,}"])
    lines += _table(header, rows)
    names = list(report["sources"])
    lines += ["", "tokens read per stage (the per-step record):"]
    lines += _table(["stage", "steps", *names],
                    [[st["stage"], str(st["steps"]), *(f"{st['tokens'].get(n, 0):,}" for n in names)]
                     for st in report["stages"]])
    bad = [n for n, s in report["sources"].items() if not s["steps_agree"]]
    lines.append("")
    lines.append("record check: the per-step rows add up to every source's position" if not bad else
                 f"record check FAILED: the per-step rows of {', '.join(bad)} do not add up to the recorded position")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header), *map(fmt, rows)]


def data_report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="danube data-report",
                                     description="What a pretraining run read of each source: once, twice, never.")
    parser.add_argument("run_dir", help="a run directory of `python train.py`")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = data_report(args.run_dir)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    bad = [n for n, s in report["sources"].items() if not s["steps_agree"]]
    return 1 if bad else 0
