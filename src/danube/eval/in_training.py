"""Downstream evaluation inside the training loop: lm-eval tasks on the model being trained.

The model is scored through the adapter ``evaluate.py`` uses (:class:`DanubeLM`), with
the same task index (:func:`~danube.eval.suites.task_manager`: names, ``include_path``)
and :func:`~danube.eval.suites.run_tasks`, so a point logged at a step equals
``evaluate.py`` on that step's checkpoint. The evaluation leaves the training as it found
it: train mode restored, no gradient kept, and the random state (Python, NumPy, torch,
CUDA) put back, since lm-eval reseeds all of them.

On several processes the work depends on how the weights are held:

- replicated (one device, DDP): lm-eval's data-parallel protocol, each rank scoring every
  ``world_size``-th document and rank 0 gathering the metrics, so the evaluation takes
  ``1 / world_size`` of its one-device time and no rank waits on another's model;
- sharded (FSDP): every forward pass is a collective (each block all-gathers its
  shards), so every rank runs the same evaluation in lockstep: the requests, their order
  and batches follow from the tasks, ``limit`` and seed alone, and greedy generation from
  the same weights and inputs, so the ranks make the same forward calls.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate, as ``train.eval_*`` says."""

    tasks: tuple[str, ...]
    include_path: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    seed: int = 1234

    @property
    def lm_eval_limit(self) -> int | float | None:
        """lm-eval's ``limit``: a count from 1 up, a fraction below 1 (as ``evaluate.py`` passes it)."""
        return int(self.limit) if self.limit is not None and self.limit >= 1 else self.limit


def check_tasks(plan: EvalPlan, tasks_key: str, include_key: str) -> None:
    """Every task known (built in, or in ``include_path``) and its dataset available offline; before any training.

    Builds lm-eval's task index (once per process, kept for the evaluations).
    """
    from danube.eval.suites import go_offline, task_manager

    if plan.include_path and not Path(plan.include_path).is_dir():
        raise FileNotFoundError(f"{include_key}={plan.include_path}: not a directory")
    go_offline()  # datasets from the cache or local files only, as evaluate.py's offline=true
    task_manager(plan.tasks, plan.include_path, tasks_key=tasks_key, include_key=include_key)


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) random state on the way out."""
    py, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def evaluate_in_training(model, tokenizer_file: str | Path, plan: EvalPlan, *, rank: int = 0, world_size: int = 1,
                         sharded: bool = False) -> tuple[dict[str, float], float]:
    """Score ``plan``'s tasks on ``model``; returns (``{"eval/<task>/<metric>": value}`` on rank 0, seconds).

    Every rank calls this at the same step. ``sharded``: the model's weights are split over
    the ranks (FSDP), which then all run the whole evaluation; otherwise they share it.
    Ranks other than 0 get an empty dict.
    """
    from danube.eval.inference import TextTokenizer
    from danube.eval.lm_eval_adapter import DanubeLM
    from danube.eval.suites import SuiteTask, run_tasks, task_manager

    start = time.perf_counter()
    manager = task_manager(plan.tasks, plan.include_path, check=False)  # indexed and checked at the door
    shared = world_size > 1 and not sharded
    was_training = model.training
    model.eval()
    try:
        with kept_random_state(), torch.no_grad():
            lm = DanubeLM.from_model(model, TextTokenizer(tokenizer_file), "the model being trained",
                                     batch_size=plan.batch_size, rank=rank if shared else 0,
                                     world_size=world_size if shared else 1)
            out = run_tasks(lm, [SuiteTask(t, plan.num_fewshot) for t in plan.tasks],
                            include_path=plan.include_path, limit=plan.lm_eval_limit, seed=plan.seed,
                            manager=manager, bootstrap_iters=0)
    finally:
        model.train(was_training)
    scalars = result_scalars(out["results"]) if rank == 0 else {}
    return scalars, time.perf_counter() - start


def result_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` as TensorBoard tags: ``acc,none`` of task T is ``eval/T/acc``.

    A filter other than ``none`` is kept after a slash (``eval/gsm8k/exact_match/strict-match``);
    standard errors, aliases and other non-numbers are left out.
    """
    scalars = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            scalars[f"eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return scalars
