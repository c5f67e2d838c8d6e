"""Training checkpoints: written whole at optimizer-step boundaries, loaded without pickle, checked before use.

A stage's ``checkpoints/`` folder holds ``stepNNNNNNNN.ckpt`` files (the newest
``keep`` of them) and ``last.ckpt``, a symbolic link to the newest. A checkpoint is only
ever written when an optimizer step has just finished, so resuming from any of them
continues exactly (a state saved in the middle of gradient accumulation would lose the
micro-batches already accumulated). Resume takes the newest checkpoint that is intact:
its zip records are checked against their CRC-32s, so a truncated or overwritten file is
set aside (renamed ``*.corrupt``) and the one before it is used.

Checkpoints are loaded with ``weights_only=True``: a file planted in a run directory
cannot execute code.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from danube.files import atomic_file
from danube.schedule import StagePlan

log = logging.getLogger(__name__)

STEP_FILE = re.compile(r"^step(\d{8})\.ckpt$")
LAST = "last.ckpt"


def step_file(step: int) -> str:
    return f"step{step:08d}.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, fsync, rename into place; load without pickle.

    A kill mid-save leaves the previous checkpoint under the same name untouched.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location)


def check_checkpoint(path: str | Path) -> str | None:
    """What is wrong with a checkpoint file (None when it is intact).

    Reads the whole file once: every record's CRC-32 is compared with the zip directory.
    """
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"not a readable checkpoint ({err})"
    return None if bad is None else f"record {bad} fails its CRC check"


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``; a damaged file raises a ValueError naming it.

    ``mmap=True`` maps the tensors instead of reading them: reading one entry of a 20 GB
    checkpoint then costs next to nothing.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"corrupt checkpoint {path}: {err}") from err
    except Exception as err:  # pickle.UnpicklingError: weights_only refused something
        raise ValueError(f"{path} holds objects other than tensors and plain values; refusing to unpickle it "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def step_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every step checkpoint in ``directory``, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name)) and p.is_file()]
    return sorted(found, reverse=True)


def newest_intact(directory: str | Path) -> tuple[int, Path] | None:
    """The newest step checkpoint that passes :func:`check_checkpoint`; damaged newer ones are set aside."""
    for step, path in step_checkpoints(directory):
        problem = check_checkpoint(path)
        if problem is None:
            return step, path
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("%s is damaged (%s): moved to %s; trying the checkpoint before it", path, problem, aside.name)
    return None


def point_last(directory: Path, target: Path) -> None:
    """Make ``directory/last.ckpt`` a relative link to ``target``, atomically."""
    link = directory / LAST
    with atomic_file(link) as tmp:
        os.symlink(target.name, tmp)


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints (and Lightning-style leftovers like ``*-v1.ckpt``)."""
    removed = []
    for _, path in step_checkpoints(directory)[max(1, keep):]:
        path.unlink(missing_ok=True)
        removed.append(path)
    for path in directory.glob("step*-v*.ckpt"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def checkpoint_stage(resume: str, plans: list[StagePlan], key: str = "resume") -> str:
    """The stage of ``plans`` a pretraining checkpoint (``resume=PATH``; ``key``) belongs to, read memory-mapped."""
    path = Path(resume)
    problem = check_checkpoint(path)
    if problem:
        raise ValueError(f"{key}={path}: {problem}")
    ckpt = load_checkpoint(path, mmap=True)
    info = ckpt.get("danube") if isinstance(ckpt, dict) else None
    if not info:
        raise ValueError(f"{key}={path} is not a danube pretraining checkpoint (no 'danube' entry)")
    name = info.get("stage")
    if name is None:  # checkpoints before stage names were recorded: the stage with that sequence length
        names = [p.name for p in plans if p.seq_len == info.get("seq_len")]
        name = names[0] if len(names) == 1 else None
    if name not in [p.name for p in plans]:
        raise ValueError(f"{key}={path} belongs to stage {name!r}, which is not in this recipe "
                         f"({', '.join(p.name for p in plans)})")
    return name
