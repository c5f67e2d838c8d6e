"""The three scripts' door: what ``train.py``, ``finetune.py`` and ``evaluate.py`` settle around Hydra.

Before Hydra composes a config: which script an experiment belongs to, and ``--help``'s
group list. Around it: every failure -- Hydra's composition, the schema, a task's bad
input -- reaches the user as one line with an honest exit code (:func:`launch`,
:func:`run_entry_point`).

The three scripts share one ``conf/`` tree, so Hydra alone would list every group in each
script's ``--help`` and answer ``python train.py experiment=danube_chat_sft`` (a
fine-tuning experiment) with "Could not override 'loss'". Which script a group or an
experiment belongs to is read from the configs themselves: a script owns the groups of
its primary config's defaults list, and an experiment belongs to the script that owns
every group it overrides.

Every function takes the ``conf/`` folder the script is composed from (the scripts pass
the one beside them): nothing here guesses where a checkout is.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

log = logging.getLogger(__name__)

SCRIPTS = ("train", "finetune", "evaluate")
_EXPERIMENT = re.compile(r"^\+{0,2}experiment=(.+)$")


def _defaults(file: Path) -> list:
    with open(file) as f:
        return (yaml.safe_load(f) or {}).get("defaults") or []


def _group(entry) -> str | None:
    """The group a defaults entry names (``model: tiny``, ``override /loss: sft``), Hydra's own left out."""
    if not isinstance(entry, dict) or len(entry) != 1:
        return None
    key = next(iter(entry)).split()[-1].lstrip("/")  # "override /loss" -> "loss", "optional x" -> "x"
    return None if key == "hydra" or key.startswith("hydra/") else key


def script_groups(script: str, conf: Path) -> list[str]:
    """The config groups ``script``.py composes, in its defaults order."""
    return [g for g in map(_group, _defaults(conf / f"{script}.yaml")) if g]


def experiment_groups(name: str, conf: Path) -> set[str]:
    """The groups experiment ``name`` overrides."""
    return {g for g in map(_group, _defaults(conf / "experiment" / f"{name}.yaml")) if g}


def experiment_owner(name: str, conf: Path) -> str | None:
    """The script whose groups include every group experiment ``name`` overrides (None if none or unknown)."""
    if not (conf / "experiment" / f"{name}.yaml").is_file():
        return None
    needed = experiment_groups(name, conf)
    return next((s for s in SCRIPTS if (conf / f"{s}.yaml").is_file() and needed <= set(script_groups(s, conf))),
                None)


def options(group: str, script: str, conf: Path) -> list[str]:
    """The options of ``group`` as ``script`` can use them (experiments: only the script's own)."""
    names = sorted(p.stem for p in (conf / group).glob("*.yaml"))
    if group == "experiment":
        names = [n for n in names if experiment_owner(n, conf) == script]
    return names


def help_text(script: str, conf: Path) -> str:
    """The config-group part of ``SCRIPT.py --help``: this script's groups and experiments only."""
    lines = [f"== Configuration groups of {script}.py ==", "Compose your configuration from those groups (group=option)", ""]
    for group in script_groups(script, conf):
        lines.append(f"{group}: {', '.join(options(group, script, conf))}")
    others = [s for s in SCRIPTS if s != script]
    lines += ["", f"Groups and experiments of {' and '.join(f'{s}.py' for s in others)} are listed by their own --help."]
    return "\n".join(lines)


def check_experiment(script: str, argv: list[str], conf: Path) -> None:
    """Stop with one line when ``experiment=NAME`` belongs to another script (before Hydra fails on it)."""
    for arg in argv:
        match = _EXPERIMENT.match(arg)
        if not match:
            continue
        for name in match.group(1).split(","):  # a multirun sweep may list several
            owner = experiment_owner(name.strip(), conf)
            if owner and owner != script:
                theirs = sorted(experiment_groups(name.strip(), conf) - set(script_groups(script, conf)))
                sys.exit(f"{script}.py: error: experiment={name} is a {owner}.py experiment (it sets "
                         f"{', '.join(theirs)}, which {script}.py does not have); run: python {owner}.py "
                         f"experiment={name} ...")


def preflight(script: str, conf: Path, argv: list[str] | None = None) -> None:
    """Called by the thin scripts before ``@hydra.main``: the experiment check and the help's resolver.

    ``conf/hydra/help/danube.yaml`` asks for ``${danube_help:SCRIPT}``, answered by :func:`help_text`.
    """
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("danube_help", lambda name: help_text(name, Path(conf)), replace=True)
    check_experiment(script, sys.argv[1:] if argv is None else argv, Path(conf))


def launch(script: str, conf: Path, hydra_main: Callable[[], Any]) -> None:
    """Run a script's ``@hydra.main`` function; a config Hydra cannot compose is one line and exit code 1.

    Hydra reports its own errors over several lines (and advice such as "use +key=value"
    for a key that exists nowhere); with ``HYDRA_FULL_ERROR`` they reach this function,
    which names the key or the option and the closest valid one. ``DANUBE_TRACEBACK=1``
    shows the traceback instead.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from danube.config import SCHEMAS, one_line
    from danube.errors import USER_ERRORS

    preflight(script, conf)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing: the message is made here
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException, *USER_ERRORS) as err:
        if os.environ.get("DANUBE_TRACEBACK"):
            raise
        print(f"{script}.py: error: {one_line(err, SCHEMAS[script])} (DANUBE_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)


def run_entry_point(script: str, task: Callable[[Any], Any], cfg: Any) -> Any:
    """Run ``task(cfg)`` for ``train.py``/``finetune.py``/``evaluate.py`` with honest exit codes.

    * A user error (a bad config value, a missing or damaged file, a run directory in
      use) is one line on stderr, ``SCRIPT: error: ...``, and exit code 1;
      ``DANUBE_TRACEBACK=1`` shows the traceback instead. In a multirun the error is
      raised, so the sweeper records the job as failed and goes on.
    * An interrupted run (SIGTERM, SIGINT) exits with 128 + the signal number after
      saying which checkpoint survived and how to resume: never 0.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from danube import logs
    from danube.callbacks import Interrupted
    from danube.config.hydra_runtime import is_multirun
    from danube.errors import USER_ERRORS

    logs.setup(verbose=bool(cfg.get("verbose", False)))
    try:
        return _stop_as_asked(task, cfg)
    except SIGTERMException:  # Lightning's own SIGTERM stop (fine-tuning), a SystemExit with code 0
        log.warning("%s: stopped by SIGTERM before the end; fine-tuning keeps no checkpoint: run the same command "
                    "again to start it over", script)
        sys.exit(143)
    except Interrupted as err:
        if err.at_once:  # one line: the user asked to stop now
            print(f"{script}: {err}", file=sys.stderr)
        elif err.requeue:
            log.warning("%s: %s", script, err)
        else:
            log.warning("%s: %s. Run the same command again to %s:\n  python %s", script, err,
                        "resume from it" if err.resumable else "start it over", shlex.join(sys.argv))
        if err.requeue:  # last, once out of the trainer: the requeue ends the job's tasks, this one included
            from danube import cluster

            log.warning("%s: %s", script, cluster.requeue(err.requeue, resumes=err.resumable))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        log.warning("%s: interrupted; the run's newest checkpoint survives: run the same command again to resume",
                    script)
        sys.exit(130)
    except USER_ERRORS as err:
        if os.environ.get("DANUBE_TRACEBACK") or is_multirun():
            raise
        print(f"{script}: error: {err} (DANUBE_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as err:
        if not lost_peer(err) or os.environ.get("DANUBE_TRACEBACK"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{script}: error: rank {os.environ.get('RANK', '?')} lost another rank of the run ({first}): a "
              "process or node of the run died or was stopped, its own log says why; launch the run again (every "
              "node) to resume from its newest checkpoint (DANUBE_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)


def _stop_as_asked(task: Callable[[Any], Any], cfg: Any) -> Any:
    """``task(cfg)``; a collective failing after a second Ctrl-C ended the other ranks is that stop."""
    from danube.callbacks import stopped_at_once

    try:
        return task(cfg)
    except RuntimeError as err:
        stop = stopped_at_once()
        if stop is None:
            raise
        raise stop from err


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "Watchdog caught collective operation timeout", "ProcessGroupNCCL is shutting down")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank of the run is gone (killed, lost, timed out)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return False
    return isinstance(err, getattr(dist, "DistNetworkError", ())) or any(p in str(err) for p in _PEER_LOST)
