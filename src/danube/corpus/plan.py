"""The plan of a corpus run: its inputs, settings, units of work and which task does which.

Written once to ``WORK/plan.json`` before any task starts; every task (on this machine or
a cluster node) reads its own share from it. A rerun with the same inputs (names, sizes,
modification times) and settings continues the run; anything else starts it over.
"""

from __future__ import annotations

import json
from pathlib import Path

from danube.corpus.inputs import Unit

PLAN = "plan.json"
# A task's share of the input: small enough to spread a corpus over many workers (and to
# lose little to a kill), big enough that per-task costs (a process, a tokenizer, two
# shard writers) stay small.
MIN_TASK_BYTES = 1 << 20
MAX_TASK_BYTES = 64 << 20


def task_bytes(total: int, tasks: int | None) -> int:
    """Bytes per task: ``total / tasks`` when the task count is given, else a 16th of the input within bounds."""
    if tasks:
        return max(1, -(-total // tasks))
    return int(min(MAX_TASK_BYTES, max(MIN_TASK_BYTES, total // 16)))


def group_units(units: list[Unit], tasks: int | None, target: int) -> list[list[int]]:
    """Contiguous runs of units, one per task, in input order.

    With ``tasks``: that many runs balanced by bytes (fewer when there are fewer units). Without:
    runs of about ``target`` bytes. Only the units and these arguments decide: never the
    number of workers.
    """
    if not units:
        return []
    if tasks:
        k = min(tasks, len(units))
        total = sum(u.nbytes for u in units)
        cum, acc = [], 0
        for u in units:
            cum.append(acc)  # bytes before unit i
            acc += u.nbytes
        starts = [0]
        for j in range(1, k):  # task j starts at the first unit at or past j/k of the bytes, leaving one per task
            first = next((i for i in range(len(units)) if cum[i] * k >= j * total), len(units))
            starts.append(min(max(first, starts[-1] + 1), len(units) - (k - j)))
        bounds = [*starts, len(units)]
        return [[u.index for u in units[bounds[j]:bounds[j + 1]]] for j in range(k)]
    groups, size = [[]], 0
    for u in units:
        if groups[-1] and size + u.nbytes > target:
            groups.append([])
            size = 0
        groups[-1].append(u.index)
        size += u.nbytes
    return groups


def load_plan(work_dir: str | Path) -> dict:
    return json.loads((Path(work_dir) / PLAN).read_text())


def same_run(plan: dict, key: dict) -> bool:
    """Whether an existing plan was made from the same inputs and settings as ``key``."""
    return plan.get("key") == key
