"""Run lm-eval tasks, each with its own number of shots, and pick the report's metric of each.

A suite (``conf/suite/*.yaml``) lists ``{task, num_fewshot, metric, column}`` entries.
Datasets come from the Hugging Face cache or local files only: a task whose dataset is
not available offline fails before any model work, with its name and how to supply it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

log = logging.getLogger(__name__)


class DatasetUnavailableError(OSError):
    """Datasets of the chosen tasks are neither in the local cache nor in local files."""


@dataclass(frozen=True)
class SuiteTask:
    task: str
    num_fewshot: int | None
    metric: str | None = None  # lm-eval result key, e.g. "acc_norm,none"
    column: str | None = None  # table column it fills


def parse_entries(entries: Iterable[Any], task_map: dict[str, str] | None = None) -> list[SuiteTask]:
    """Suite entries (dicts) -> :class:`SuiteTask`, with ``task_map`` replacements applied."""
    task_map = dict(task_map or {})
    out = []
    for i, e in enumerate(entries):
        e = dict(e)
        if "task" not in e:
            raise ValueError(f"suite entry {i} has no 'task' key: {e}")
        unknown = set(e) - {"task", "num_fewshot", "metric", "column"}
        if unknown:
            raise ValueError(f"suite entry {i} ({e['task']}): unknown keys {sorted(unknown)}")
        task = task_map.pop(e["task"], e["task"])
        out.append(SuiteTask(task, e.get("num_fewshot"), e.get("metric"), e.get("column")))
    if task_map:
        raise ValueError(f"task_map names tasks that are not in the suite: {sorted(task_map)}")
    return out


def go_offline() -> None:
    """Make datasets / huggingface_hub refuse the network, even if already imported."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(config, name):
                setattr(config, name, True)


def _dataset_of(task_manager, name: str) -> str:
    entry = task_manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    if not isinstance(cfg, dict) or not cfg.get("dataset_path"):
        return "its dataset"
    path, sub = cfg["dataset_path"], cfg.get("dataset_name")
    return f"{path}" + (f" (config {sub})" if sub else "")


def check_available(task_manager, tasks: Iterable[str], tasks_key: str | None = None,
                    include_key: str = "include_path") -> None:
    """Load every task (its dataset included) now, before any model work; one error names all that fail.

    An unknown task name fails first (``ValueError``, one line naming ``tasks_key`` when
    given and ``include_key``, the setting it was looked for in); then every task whose
    dataset is neither cached nor in local files is listed in one
    :class:`DatasetUnavailableError`, with the two ways to supply it.
    """
    tasks = list(dict.fromkeys(tasks))
    unknown = [name for name in tasks if name not in task_manager.all_tasks]
    if unknown:
        raise ValueError(
            f"{tasks_key + ': ' if tasks_key else ''}unknown lm-eval task(s) {unknown}: not built-in tasks and not in "
            f"{include_key} ({task_manager.include_path or 'none given'})"
        )
    missing: dict[str, str] = {}
    for name in tasks:
        try:
            task_manager.load([name])
        except OSError as err:  # ConnectionError (offline), FileNotFoundError (missing files)
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            missing[name] = f"{_dataset_of(task_manager, name)} ({type(err).__name__}: {reason})"
            log.debug("task %s could not load its dataset", name, exc_info=True)
    if missing:
        listed = "\n".join(f"  {name}: {why}" for name, why in missing.items())
        use = (f"{include_key}=FOLDER task_map={{{next(iter(missing))}: YOUR_TASK, ...}}" if tasks_key is None
               else f"{include_key}=FOLDER and YOUR_TASK in {tasks_key}")
        raise DatasetUnavailableError(
            f"{len(missing)} of {len(tasks)} task(s) need datasets that are not available offline:\n{listed}\n"
            f"Supply them either (a) in the Hugging Face cache: run {'' if tasks_key is None else 'evaluate.py '}once "
            "with network access and `offline=false`, "
            "keeping HF_DATASETS_CACHE/HF_HOME, then offline with the same cache dir; or (b) as local files: write a "
            "task YAML with `dataset_path: json` and `dataset_kwargs: {data_files: {test: FILE}}` into a folder, and "
            f"run with {use}"
        )


def task_manager(tasks: Iterable[str], include_path: str | None = None, *, check: bool = True,
                 tasks_key: str | None = None, include_key: str = "include_path"):
    """lm-eval's task index with ``include_path``, every task of ``tasks`` checked loadable (datasets too).

    ``check=False`` skips the check (made once already: evaluation during training);
    ``tasks_key`` and ``include_key`` are the settings an error names.
    """
    manager = _task_index(str(include_path) if include_path else None)
    if check:
        check_available(manager, tasks, tasks_key, include_key)
    return manager


@functools.lru_cache(maxsize=8)
def _task_index(include_path: str | None):
    """lm-eval's ``TaskManager``, built once per process and ``include_path``.

    Building one reads every task YAML lm-eval ships (thousands: 16-20 s on 2 cores); an
    evaluation run that calls lm-eval more than once (one call per shot count, a suite per
    model, evaluation during training) indexes them once.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def run_tasks(
    lm,
    tasks: list[SuiteTask],
    include_path: str | None = None,
    limit: float | None = None,
    seed: int = 1234,
    log_samples: bool = False,
    manager=None,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """Evaluate ``tasks`` with one model instance; one ``simple_evaluate`` per shot count.

    ``manager`` is a :func:`task_manager` made (and checked) before the model was loaded;
    without one it is made here. ``bootstrap_iters`` is lm-eval's: standard errors in
    closed form for means (acc, exact_match), by bootstrap for the others; 0 gives none.

    Returns lm-eval's ``results`` / ``n-shot`` / ``configs`` / ``versions`` /
    ``higher_is_better`` merged over the calls, plus ``scores``: ``{column or task: value}``
    of each entry's metric, in percent.
    """
    from lm_eval import simple_evaluate

    if manager is None:
        manager = task_manager([t.task for t in tasks], include_path)
    by_shots: dict[int | None, list[SuiteTask]] = defaultdict(list)
    for t in tasks:
        by_shots[t.num_fewshot].append(t)
    merged: dict[str, Any] = {"results": {}, "n-shot": {}, "configs": {}, "versions": {}, "higher_is_better": {},
                              "samples": {}}
    for shots, group in by_shots.items():
        log.info("lm-eval: %s with num_fewshot=%s", [t.task for t in group], shots)
        out = simple_evaluate(
            model=lm, tasks=[t.task for t in group], num_fewshot=shots, limit=limit, task_manager=manager,
            bootstrap_iters=int(bootstrap_iters), log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        ) or {}  # None on the ranks other than 0 of a model that shares the work (lm.world_size > 1)
        for key in merged:
            merged[key].update(out.get(key) or {})
    scores: dict[str, float | None] = {}
    for t in tasks:
        res = merged["results"].get(t.task, {})
        metric = t.metric or next((k for k in res if "," in k and not k.endswith("_stderr") and "stderr" not in k), None)
        value = res.get(metric) if metric else None
        if metric and value is None:
            log.warning("task %s has no metric %r; its results hold %s", t.task, metric, sorted(res))
        scores[t.column or t.task] = None if value is None else 100.0 * float(value)
    merged["scores"] = scores
    if not log_samples:
        merged.pop("samples")
    return merged


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own Markdown table of every task and metric, standard errors included (what ``lm_eval`` prints)."""
    from lm_eval.utils import make_table

    return make_table({k: results.get(k) or {} for k in ("results", "versions", "n-shot", "higher_is_better")})
