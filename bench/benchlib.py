"""What the benchmark scripts share: machine description, timing, the BENCHMARKS.md writer.

The scripts run as ``python bench/NAME.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Written by the scripts in `bench/` (each rewrites its own section; see the README's\n"
    "\"Benchmarks\" section). Figures are medians of several runs on the machine named in each\n"
    "section; re-run the command shown to measure your own.\n"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU model and cores, torch version and threads, GPU if any."""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores", f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
             f"Python {platform.python_version()}"]
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}")
    else:
        parts.append("no GPU")
    return "; ".join(parts)


def run_command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def add_write_flags(parser) -> None:
    """``--write`` / ``--no-write``: full runs update BENCHMARKS.md, ``--quick`` ones only print.

    A quick run is a smoke check (fewer settings, fewer repeats): its figures are not the
    ones to publish, so it leaves the tracked BENCHMARKS.md alone unless asked.
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="update BENCHMARKS.md (the default, except with --quick)")
    group.add_argument("--no-write", action="store_true", help="only print the table")


def should_write(args) -> bool:
    """What :func:`add_write_flags` means for these parsed arguments."""
    return bool(args.write) or not (args.no_write or getattr(args, "quick", False))


def publish(name: str, title: str, header: list[str], rows: list[list[object]], note: str, write: bool = True,
            path: Path = BENCHMARKS) -> None:
    """Print the table; unless ``write`` is false, also make it section ``name`` of ``path``
    (BENCHMARKS.md: the Markdown table followed by ``note``, which says what the figures are)."""
    print(text_table(header, rows))
    if write:
        path = write_section(name, title, f"{markdown_table(header, rows)}\n\n{note}", Path(path))
        print(f"wrote {os.path.relpath(path, REPO)}")


def write_section(name: str, title: str, body: str, path: Path = BENCHMARKS, command: str | None = None) -> Path:
    """Replace (or append) the section ``name`` of BENCHMARKS.md, leaving the others as they are.

    A section is delimited by ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; the
    machine, the command and the date are written above ``body``.
    """
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"<!-- bench:{name} -->\n## {title}\n\n"
               f"- machine: {machine()}\n- command: `{command or run_command()}`\n- date: {stamp}\n\n{body.strip()}\n"
               f"<!-- /bench:{name} -->")
    text = path.read_text() if path.is_file() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return path
