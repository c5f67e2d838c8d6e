"""A run directory: one writer at a time, the config of every invocation, no results under a config they did not run with.

* :func:`lock` holds ``RUN_DIR/.lock`` (``flock``) for as long as the run writes: a second
  ``train.py`` into the same directory stops at once, naming the process that holds it. The
  kernel releases the lock when its process dies, so a killed run never leaves it stuck.
* :func:`record_invocation` keeps ``history/NNNN-<time>.yaml`` (the resolved config of each
  invocation, with the command line and what changed) beside ``config.yaml`` (the newest).
* :func:`check_changes` compares a new invocation with the recorded config before any work:
  a change to what makes the run *this* run (the model, the data and its tokenizer, the
  batch geometry, the recipe, the seed) is refused on resume; other changes (LR, logging)
  are allowed on a run that still has steps to train, and logged; on a finished run any
  change that affects training is refused, since nothing would train under it and its
  results would be reported under values they were not made with.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from danube.files import atomic_write_text

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
HISTORY_DIR = "history"


class RunDirBusy(OSError):
    """Another process holds the run directory's lock."""


class ConfigChanged(ValueError):
    """An invocation that would mix two runs in one directory."""


def resolve(run_dir: str | None, *, name: str | None, runs_dir: str | Path, job_dir: Path | None = None) -> Path:
    """Where a run writes: ``run_dir`` if given; a multirun job's own folder; else ``runs_dir/name``.

    ``name`` defaults to the model preset's name (``runs/tiny``), so the same command
    finds the same directory and resumes.
    """
    if run_dir:
        return Path(run_dir)
    if job_dir is not None:
        return job_dir
    return Path(runs_dir) / str(name or "run")


def is_rank_zero() -> bool:
    """Whether this process is the first of its job (the others are started later by the launcher)."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


@contextmanager
def lock(run_dir: str | Path, what: str = "run") -> Iterator[None]:
    """Hold ``run_dir/.lock`` exclusively while the block runs (only the job's first process locks)."""
    import fcntl

    if not is_rank_zero():
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            raise RunDirBusy(
                f"{run_dir} is in use by another {what} ({holder}); one process writes to a run directory at a "
                "time: wait for it to finish, or choose another run_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing the descriptor releases the lock


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        if not tree and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: tree}


def matches(key: str, patterns: tuple[str, ...]) -> bool:
    """A dotted config key is one of ``patterns`` or lies under one (``optim.lr`` under ``optim``)."""
    return any(key == p or key.startswith(p + ".") for p in patterns)


def same_value(a: Any, b: Any) -> bool:
    """Equal as config values: ``3e-3 == 0.003``, lists and mappings element by element, absent as null."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):  # an absent key is a null one (a stage without weights)
        return all(same_value(a.get(k), b.get(k)) for k in a.keys() | b.keys())
    return a == b


def read_recorded(run_dir: str | Path) -> dict | None:
    """The config of the run directory's newest invocation, or None for a new directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        recorded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not readable as YAML ({err}); restore it from {Path(run_dir) / HISTORY_DIR}") from err
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return recorded


def diff(old: Mapping, new: Mapping, ignore: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` of every dotted key whose value differs (``ignore`` prefixes left out)."""
    a, b = flatten(old), flatten(new)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        if matches(key, ignore):
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va is missing or vb is missing or not same_value(va, vb):
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def _describe(changes: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:limit])
    return shown + (f" (and {len(changes) - limit} more)" if len(changes) > limit else "")


def check_changes(
    run_dir: Path,
    recorded: Mapping | None,
    new: Mapping,
    *,
    identity: tuple[str, ...],
    cosmetic: tuple[str, ...],
    ignore: tuple[str, ...],
    finished: bool,
) -> list[tuple[str, Any, Any]]:
    """Refuse an invocation that does not continue the recorded run; return the changes it may make.

    Args:
        recorded: the run directory's config (None: a new run, nothing to compare).
        new: this invocation's resolved config.
        identity: key prefixes that make the run this run: any change is refused.
        cosmetic: key prefixes that never affect the numbers (logging, checkpoint intervals).
        ignore: key prefixes not compared at all (paths, the stage selection, ...).
        finished: nothing is left to train: every change except the cosmetic ones is refused.
    """
    if recorded is None:
        return []
    changes = diff(recorded, new, ignore)
    fixed = [c for c in changes if matches(c[0], identity)]
    if fixed:
        raise ConfigChanged(
            f"{run_dir} holds a run made with other values of {_describe(fixed)}: continuing it would mix two runs. "
            f"Use the original values, or another run_dir (model_dir=MODEL_DIR starts a new run from a model's weights); "
            f"its config is {run_dir / CONFIG_FILE}"
        )
    if finished:
        effective = [c for c in changes if not matches(c[0], cosmetic)]
        if effective:
            raise ConfigChanged(
                f"{run_dir} holds a finished run made with {_describe(effective)} (recorded -> asked): nothing would "
                "train, and its results would be reported under values they were not made with. Use another run_dir "
                "for the new values"
            )
    if changes:
        log.warning("%s: continuing with changed settings: %s", run_dir, _describe(changes, limit=20))
    return changes


RUNTIME_PREFIX = "# runtime: "


def record_invocation(run_dir: Path, config: Mapping, changes: list[tuple[str, Any, Any]],
                      runtime: Mapping[str, Any] | None = None) -> Path:
    """Append this invocation to ``history/`` and make its config ``config.yaml``; returns the history file.

    ``runtime`` (torch version, threads, MKL mode: :func:`danube.determinism.runtime`) goes in
    the header as one JSON line; :func:`runtime_changes` compares the next invocation with it.
    """
    history = run_dir / HISTORY_DIR
    history.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name[:4]) for p in history.glob("[0-9][0-9][0-9][0-9]-*.yaml")), default=0)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    body = yaml.safe_dump(dict(config), sort_keys=False)
    header = [f"# invocation {number} at {time.strftime('%Y-%m-%d %H:%M:%S %z')} on {socket.gethostname()}",
              f"# command: {' '.join(sys.argv)}"]
    if runtime is not None:
        header.append(RUNTIME_PREFIX + json.dumps(dict(runtime), sort_keys=True))
    header += [f"# changed: {k}: {a!r} -> {b!r}" for k, a, b in changes]
    path = atomic_write_text(history / f"{number:04d}-{stamp}.yaml", "\n".join(header) + "\n" + body)
    atomic_write_text(run_dir / CONFIG_FILE, body)
    return path


def last_runtime(run_dir: Path) -> dict[str, Any] | None:
    """The runtime the newest recorded invocation ran on (None: no history, or recorded before runtimes were)."""
    entries = sorted((run_dir / HISTORY_DIR).glob("[0-9][0-9][0-9][0-9]-*.yaml"))
    for line in (entries[-1].read_text().splitlines() if entries else []):
        if line.startswith(RUNTIME_PREFIX):
            try:
                return json.loads(line[len(RUNTIME_PREFIX):])
            except ValueError:
                return None
        if not line.startswith("#"):
            break
    return None


def runtime_changes(run_dir: Path, runtime: Mapping[str, Any]) -> list[str]:
    """What differs from the last invocation's runtime in what decides the bits (warned: resume is still allowed)."""
    before = last_runtime(run_dir)
    if before is None:
        return []
    keys = ("torch", "threads", "cpu_capability", "mkl_cbwr", "deterministic")
    changed = [f"{k} {before.get(k)!r} -> {runtime.get(k)!r}" for k in keys if before.get(k) != runtime.get(k)]
    if changed:
        log.warning("%s: this invocation computes with other numerics than the last (%s): the result will match "
                    "an uninterrupted run closely but not bit for bit", run_dir, ", ".join(changed))
    return changed
