"""What ``train.py``, ``finetune.py`` and ``evaluate.py`` settle before Hydra composes a config.

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

import re
import sys
from pathlib import Path

import yaml

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
