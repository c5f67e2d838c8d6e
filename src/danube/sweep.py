"""Hyper-parameter sweeps: the objective ``train.py`` returns, each job's record, and ``danube sweep-report``.

A sweep is a Hydra multirun (``python train.py -m ...``, ``conf/hparams_search/``): every
job is a run directory ``MULTIRUN/<job number>/`` holding ``.hydra/overrides.yaml``, the
run's ``config.yaml``, its TensorBoard scalars and ``result.json``, the last two written by
:class:`RecordJob` (a Hydra callback, failed jobs too). The report gathers them into one
table sorted by validation loss.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.experimental.callback import Callback

from danube.files import atomic_write_text

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from danube.tasks.train import TrainResult

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"  # one job's outcome, beside its .hydra/ folder
STATUS_ORDER = ("complete", "diverged", "incomplete", "failed", "mismatch", "not started")


# -- the objective ----------------------------------------------------------------------
def objective(result: TrainResult | None) -> float | None:
    """What a sweeper minimises: the last validation loss of the last stage.

    A loss that is missing or not finite becomes ``inf``, so Optuna records a (very bad)
    completed trial instead of aborting the study; the log says why.
    """
    if result is None:  # plan=true: nothing was trained
        return None
    value = result.final_val_loss
    if value is None:
        log.warning("run %s returned no validation loss: objective = inf", result.run_dir)
        return math.inf
    if not math.isfinite(value):
        log.warning("run %s ended with validation loss %s (diverged): objective = inf", result.run_dir, value)
        return math.inf
    return float(value)


class RecordJob(Callback):
    """Hydra callback: each multirun job's overrides and outcome in its folder, for :func:`sweep_report`.

    Configured in ``conf/train.yaml`` (``hydra.callbacks``); a single run is left alone.
    At the start of a job it writes ``.hydra/overrides.yaml`` (Hydra itself writes nothing:
    ``hydra.output_subdir`` is null) and a ``result.json`` that says the job has not ended,
    which is what a killed or interrupted job leaves. At the end it writes the outcome: the
    exception of a failed job, or the objective ``main`` returned with the final losses and
    tokens the last stage recorded (``complete.json``).
    """

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        job_dir = _job_dir(config)
        if job_dir is None:
            return
        atomic_write_text(job_dir / ".hydra" / "overrides.yaml",
                          "".join(f"- {_yaml_scalar(o)}\n" for o in config.hydra.overrides.task))
        write_json(job_dir / RESULT_FILE, {"status": "incomplete",
                                           "error": "no outcome recorded: killed, interrupted, or still running"})

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        job_dir = _job_dir(config)
        if job_dir is None:
            return
        if job_return.status == JobStatus.FAILED:
            err = job_return._return_value  # the exception; the property would raise it again
            log.error("job %s failed:\n%s", job_dir, "".join(traceback.format_exception(err)))
            write_json(job_dir / RESULT_FILE, {"status": "failed", "error": f"{type(err).__name__}: {err}"})
            return
        write_json(job_dir / RESULT_FILE, job_outcome(job_dir, job_return.cfg, job_return.return_value))


def _job_dir(config: DictConfig) -> Path | None:
    """A multirun job's folder (None in a single run)."""
    from hydra.types import RunMode

    if config.hydra.mode != RunMode.MULTIRUN:
        return None
    return Path(config.hydra.runtime.output_dir)


def job_outcome(job_dir: Path, cfg: DictConfig, value: float | None) -> dict:
    """What ``result.json`` records of a job that returned ``value`` (:func:`objective`)."""
    if value is None:  # plan=true
        return {"status": "not started", "error": "plan=true: nothing was trained"}
    status = "complete" if math.isfinite(value) else "diverged"
    record = {}
    stage = _last_stage(cfg)
    if stage is not None and (job_dir / stage / "complete.json").is_file():
        record = json.loads((job_dir / stage / "complete.json").read_text())
    else:
        status = "incomplete"  # stopped at train.max_steps: the last stage has no completion record
    out = {"status": status, "objective": _json_float(value)}
    if record:
        out.update(final_val_loss=_json_float(record.get("final_val_loss")),
                   final_train_loss=_json_float(record.get("final_train_loss")), tokens_seen=record.get("tokens_seen"))
    return out


def _last_stage(cfg) -> str | None:
    """The last stage a train config runs (``stage=all``: the recipe's last; a cooldown: its own)."""
    if ((cfg.get("cooldown") or {}).get("checkpoint")):
        from danube.tasks.cooldown import STAGE

        return STAGE
    stages = [s["name"] for s in (cfg.get("recipe") or {}).get("stages") or []]
    last = stages[-1] if cfg.get("stage", "all") == "all" and stages else cfg.get("stage")
    return None if last in (None, "all") else str(last)


def _yaml_scalar(text: str) -> str:
    import yaml

    return yaml.safe_dump(text, default_style="'").strip()


def _json_float(value: float | None) -> float | str | None:
    # JSON has no NaN or infinity: keep them as strings that float() reads back.
    return value if value is None or math.isfinite(value) else str(value)


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# -- the report -------------------------------------------------------------------------
@dataclass
class Job:
    """One job of a multirun, as its directory records it."""

    name: str                      # the job's directory name (Hydra's job number)
    path: Path
    overrides: dict[str, str]      # key -> value, as given to Hydra
    status: str = "not started"
    val_loss: float | None = None
    train_loss: float | None = None
    tokens: int | None = None
    error: str | None = None


def find_jobs(multirun_dir: str | Path) -> list[Job]:
    """Every job directory of a multirun, in job order; a clear error if it is not one."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    dirs = sorted((p.parent.parent for p in root.glob("*/.hydra/overrides.yaml")), key=_job_sort_key)
    if not dirs:
        hint = (" (it looks like a single job of one: give its parent)"
                if (root / ".hydra" / "overrides.yaml").is_file() else "")
        raise FileNotFoundError(
            f"{root} is not a Hydra multirun directory: no job folders with .hydra/overrides.yaml inside{hint}. "
            "`python train.py -m ...` writes them under runs/multirun/<date>_<time>/"
        )
    return [read_job(d) for d in dirs]


def _job_sort_key(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def parse_overrides(lines: list[str], where: Path) -> dict[str, str]:
    """Hydra override strings (``optim.lr=0.003``, ``+x=1``, ``~y``) -> {key: value}."""
    out = {}
    for line in lines:
        if not isinstance(line, str) or not line:
            raise ValueError(f"{where}: expected a list of override strings, found {line!r}")
        key, sep, value = line.partition("=")
        out[key.lstrip("+~")] = value if sep else "(deleted)"
    return out


def read_job(path: Path) -> Job:
    """A job's overrides, outcome and last losses: from result.json, the run's files and its scalars."""
    from omegaconf import OmegaConf

    overrides_file = path / ".hydra" / "overrides.yaml"
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file))
    except Exception as err:  # a YAML error names neither the file nor the job
        raise ValueError(f"{overrides_file}: not readable as YAML: {err}") from err
    if not isinstance(overrides, list):
        raise ValueError(f"{overrides_file}: expected a list of overrides, found {type(overrides).__name__}")
    job = Job(name=path.name, path=path, overrides=parse_overrides(overrides, overrides_file))
    _read_scalars_into(job)
    recorded = _read_result_file(path / RESULT_FILE)
    if recorded:
        job.status = recorded.get("status", job.status)
        job.error = recorded.get("error")
        for key in ("final_val_loss", "final_train_loss"):  # what the run itself returned wins
            if recorded.get(key) is not None:
                setattr(job, key.removeprefix("final_"), float(recorded[key]))
        if recorded.get("tokens_seen") is not None:
            job.tokens = int(recorded["tokens_seen"])
    else:
        job.status = _status_from_files(job)
    if job.status == "complete" and (job.val_loss is None or not math.isfinite(job.val_loss)):
        job.status = "diverged"
    mismatched = ran_with_other_values(job)
    if mismatched:
        # The job folder was reused with new values: what it holds was not made with its overrides.
        job.status, job.error = "mismatch", "the run in this folder was made with " + ", ".join(mismatched)
        job.val_loss = job.train_loss = None
    return job


def ran_with_other_values(job: Job) -> list[str]:
    """``key=value`` of each override the run's own ``config.yaml`` disagrees with."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from danube.rundir import flatten, same_value

    config = job.path / "config.yaml"
    if not config.is_file():
        return []
    try:
        ran = flatten(yaml.safe_load(config.read_text()) or {})
    except yaml.YAMLError:
        return []
    parser = OverridesParser.create()
    out = []
    for key, value in job.overrides.items():
        if key not in ran or value == "(deleted)":
            continue  # a config group choice (model=tiny), or a key the run does not record
        try:
            (override,) = parser.parse_overrides([f"{key}={value}"])
            want = override.value()
        except Exception:  # noqa: BLE001 - Hydra's grammar errors: nothing to compare with
            continue
        if not same_value(want, ran[key]):
            out.append(f"{key}={ran[key]!r} (overrides.yaml: {value})")
    return out


def _read_result_file(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        log.warning("%s is not valid JSON (%s): status taken from the run's files", path, err)
        return None
    return data if isinstance(data, dict) else None


def _read_scalars_into(job: Job) -> None:
    from danube.plot import read_scalars

    try:
        scalars = read_scalars(job.path)
    except FileNotFoundError:
        return
    if scalars.get("val/loss"):
        job.val_loss = float(scalars["val/loss"][-1][1])
    if scalars.get("train/loss"):
        job.train_loss = float(scalars["train/loss"][-1][1])
    steps = [points[-1][0] for points in scalars.values() if points]
    if steps:
        job.tokens = int(max(steps))


def _status_from_files(job: Job) -> str:
    """Without result.json (killed, or still running): complete only if the last stage finished."""
    from omegaconf import OmegaConf

    config = job.path / "config.yaml"
    if not config.is_file():
        return "not started"
    last = _last_stage(OmegaConf.load(config))
    stage = job.path / last if last else None
    # complete.json is written last; older runs wrote final.ckpt, then the model directory.
    done = stage is not None and ((stage / "complete.json").is_file() or
                                  ((stage / "final.ckpt").is_file() and (stage / "model" / "model.safetensors").is_file()))
    return "complete" if done else "incomplete"


def sort_jobs(jobs: list[Job]) -> list[Job]:
    """Finite validation losses first, lowest first; then the rest by status, then job order."""
    def key(job: Job) -> tuple:
        finite = job.val_loss is not None and math.isfinite(job.val_loss) and job.status == "complete"
        return (0 if finite else 1, job.val_loss if finite else 0.0,
                STATUS_ORDER.index(job.status) if job.status in STATUS_ORDER else len(STATUS_ORDER),
                _job_sort_key(job.path))

    return sorted(jobs, key=key)


def split_overrides(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """(keys whose values differ between jobs, {key: value} shared by every job)."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    varying, fixed = [], {}
    for k in keys:
        values = {job.overrides.get(k) for job in jobs}
        if len(values) == 1 and None not in values:
            fixed[k] = values.pop()
        else:
            varying.append(k)
    return varying, fixed


def _fmt_value(value: str | None) -> str:
    """Sampled floats (0.0012345678) shortened to 4 significant digits; the rest as written."""
    if value is None:
        return "-"
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)(e[-+]?\d+)?", value, re.I) and ("." in value or "e" in value.lower()):
        return f"{float(value):.4g}"
    return value.replace("|", "\\|")


def _fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown_table(jobs: list[Job], title: str, best: dict | None = None) -> str:
    """The report: a count by status, the overrides every job shares, one row per job."""
    varying, fixed = split_overrides(jobs)
    lines = [f"# Sweep {title}", ""]
    counts = {s: sum(j.status == s for j in jobs) for s in STATUS_ORDER}
    lines.append(f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".")
    if best and "best_value" in best:
        params = ", ".join(f"`{k}={v}`" for k, v in (best.get("best_params") or {}).items())
        lines += ["", f"Optuna's best value: {best['best_value']} with {params}"]
    if fixed:
        lines += ["", "Same for every job: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items())]
    head = ["rank", "job", *varying, "val loss", "train loss", "tokens", "status"]
    numeric = {"rank", "val loss", "train loss", "tokens"}
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in numeric else "---" for h in head) + "|"]
    for rank, job in enumerate(jobs, 1):
        status = job.status + (f": {job.error}" if job.error else "")
        row = [str(rank), job.name, *(_fmt_value(job.overrides.get(k)) for k in varying),
               _fmt_loss(job.val_loss), _fmt_loss(job.train_loss),
               "-" if job.tokens is None else f"{job.tokens:,}", status.replace("|", "\\|").replace("\n", " ")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def csv_text(jobs: list[Job]) -> str:
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", "job", *keys, "val_loss", "train_loss", "tokens", "status", "error"])
    for rank, job in enumerate(jobs, 1):
        writer.writerow([rank, job.name, *(job.overrides.get(k, "") for k in keys),
                         "" if job.val_loss is None else job.val_loss,
                         "" if job.train_loss is None else job.train_loss,
                         "" if job.tokens is None else job.tokens, job.status, job.error or ""])
    return buf.getvalue()


def _hparam_value(value: str | None) -> float | str:
    if value is None:
        return "-"
    try:
        return float(value)
    except ValueError:
        return value


def write_tensorboard_hparams(jobs: list[Job], out_dir: Path) -> None:
    """One TensorBoard run per job with its overrides as hparams, so the HParams tab compares them.

    Written to a temporary folder that replaces ``out_dir``: a second report does not
    duplicate the runs.
    """
    from torch.utils.tensorboard import SummaryWriter

    from danube.files import atomic_dir

    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    with atomic_dir(out_dir) as tmp:
        with SummaryWriter(log_dir=str(tmp)) as writer:
            for job in jobs:
                hparams = {k: _hparam_value(job.overrides.get(k)) for k in keys}
                hparams["status"] = job.status
                # Only finite metrics: a failed job still shows its hparams and status.
                metrics = {f"hparam/{name}": value for name, value in
                           (("val_loss", job.val_loss), ("train_loss", job.train_loss),
                            ("tokens", None if job.tokens is None else float(job.tokens)))
                           if value is not None and math.isfinite(value)}
                writer.add_hparams(hparams, metrics, run_name=job.name)


def sweep_report(multirun_dir: str | Path, *, tensorboard: bool = True) -> tuple[list[Job], dict[str, Path]]:
    """Collect a multirun's jobs, sorted; write sweep.md, sweep.csv and TensorBoard hparams beside them."""
    root = Path(multirun_dir)
    jobs = sort_jobs(find_jobs(root))
    best = None
    if (root / "optimization_results.yaml").is_file():  # the Optuna sweeper's summary, once the study ended
        from omegaconf import OmegaConf

        best = OmegaConf.to_container(OmegaConf.load(root / "optimization_results.yaml"))
    written = {"markdown": root / "sweep.md", "csv": root / "sweep.csv"}
    atomic_write_text(written["markdown"], markdown_table(jobs, root.name, best if isinstance(best, dict) else None))
    atomic_write_text(written["csv"], csv_text(jobs))
    if tensorboard:
        written["tensorboard"] = root / "hparams"
        write_tensorboard_hparams(jobs, written["tensorboard"])
    return jobs, written


def sweep_report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="danube sweep-report",
        description="Tabulate a Hydra multirun of train.py by validation loss: sweep.md, sweep.csv and "
                    "TensorBoard hparams (MULTIRUN_DIR/hparams) beside it.",
    )
    parser.add_argument("multirun_dir", help="the sweep's directory, e.g. runs/multirun/2026-11-23_09-30-00")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip writing TensorBoard hparams")
    args = parser.parse_args(argv)
    jobs, written = sweep_report(args.multirun_dir, tensorboard=not args.no_tensorboard)
    print(written["markdown"].read_text())
    for what, path in written.items():
        print(f"wrote {what}: {path}")
    if "tensorboard" in written:
        print(f"compare runs: tensorboard --logdir {written['tensorboard']}  (HParams tab)")
    return 0

