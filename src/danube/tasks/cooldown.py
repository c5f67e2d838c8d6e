"""Cooldowns: a short LR decay branched from any checkpoint of a run, into a run directory of its own.

With ``optim.schedule=wsd`` the LR stays at its peak until the run's final decay, so a
checkpoint of the constant part is a model that has not been annealed yet. A cooldown
starts from such a checkpoint (its weights, optimizer moments, tokens seen and place in
the walk through the data), decays the LR from the checkpoint's value to ``optim.min_lr``
over ``cooldown.tokens`` with ``cooldown.shape``, and ends with a model directory: what the
run would be had it stopped there. The run branched from is only read (its checkpoint is
hard-linked into the cooldown's directory, so it may go on training and rotate its
checkpoints meanwhile); cooldowns taken at several points compare in one multirun
(``-m cooldown.checkpoint=A,B,C`` and ``danube sweep-report``).

The branch continues the parent's token axis (TensorBoard curves overlay the parent's) and
its data: the stage the checkpoint was taken in, at that stage's sequence length and
mixture, from the checkpoint's position on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from danube import rundir
from danube.checkpoints import check_checkpoint, checkpoint_stage, load_checkpoint
from danube.config import PretrainConfig
from danube.config.train import upgrade_recorded
from danube.schedule import Schedule, StagePlan, plan_stages

log = logging.getLogger(__name__)

STAGE = "cooldown"  # the branch's one stage: RUN_DIR/cooldown/{checkpoints,model,complete.json}
START_FILE = "start.ckpt"  # the parent's checkpoint, hard-linked into the branch's stage directory
# What must be the parent's for its checkpoint's position and tokens to mean the same here.
PARENT_KEYS = ("model", "data.kind", "data.sources", "data.tokenizer", "data.vocab_size", "data.piece_tokens",
               "data.lanes", "recipe", "seed", "train.global_batch_tokens")


@dataclass(frozen=True)
class Branch:
    """Where a cooldown starts and what it runs."""

    checkpoint: Path  # the parent's checkpoint, as given
    parent_dir: Path | None  # the run directory it belongs to (None: a checkpoint outside one)
    stage: StagePlan  # the parent's stage the checkpoint was saved in
    step: int  # the optimizer step within that stage
    tokens_seen: int
    lr: float  # the LR of the parent's last step before the checkpoint: where the decay starts
    plan: StagePlan  # the cooldown itself: one stage at the parent stage's sequence length
    schedule: Schedule
    longest_seq_len: int  # of the parent's recipe: the walk through the data is cut by it

    def default_run_dir(self) -> Path:
        """``RUN-cooldown-STAGE-stepN-TOKENS`` beside the parent run (never inside it)."""
        parent = self.parent_dir or self.checkpoint.parent
        return parent.parent / f"{parent.name}-cooldown-{self.stage.name}-step{self.step}-{self.plan.tokens}"


def parent_run_dir(checkpoint: Path) -> Path | None:
    """The run directory of ``RUN/STAGE/checkpoints/stepN.ckpt`` or ``RUN/STAGE/final.ckpt`` (None elsewhere)."""
    path = checkpoint.absolute()
    run = path.parents[2] if path.parent.name == "checkpoints" else path.parents[1]
    return run if (run / rundir.CONFIG_FILE).is_file() else None


def open_branch(job: PretrainConfig, plans: list[StagePlan], config: dict) -> Branch:
    """Read ``cooldown.checkpoint`` (memory-mapped) and resolve the branch; one line on whatever does not fit.

    Args:
        job: this invocation's config (``cooldown`` set).
        plans: this config's recipe resolved (the parent's, when the identity check passes).
        config: this invocation's resolved config, compared with the parent run's recorded one.
    """
    c = job.cooldown
    path = Path(c.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"cooldown.checkpoint={path}: no such file (a run's "
                                "STAGE/checkpoints/stepN.ckpt, last.ckpt or final.ckpt)")
    problem = check_checkpoint(path)
    if problem:
        raise ValueError(f"cooldown.checkpoint={path}: {problem}")
    parent = parent_run_dir(path)
    if parent is not None:
        check_parent(parent, upgrade_recorded(rundir.read_recorded(parent)), config, path)
    else:
        log.warning("cooldown.checkpoint=%s is not inside a danube run directory: its run's settings cannot be "
                    "compared with this config's (model, data, recipe, seed, global batch)", path)
    stage_name = checkpoint_stage(str(path), plans, "cooldown.checkpoint")
    ckpt = load_checkpoint(path, mmap=True)
    stage = next(p for p in plans if p.name == stage_name)
    tokens = int(ckpt["danube"]["tokens_seen"])
    step = int(ckpt.get("global_step", 0))
    if tokens != stage.start_tokens + step * job.train.global_batch_tokens:
        raise ValueError(f"cooldown.checkpoint={path} is at {tokens:,} tokens, not at step {step} of stage "
                         f"{stage.name} ({stage.start_tokens:,} + {step} x {job.train.global_batch_tokens:,}): "
                         "it was made with another recipe or batch")
    try:
        lr = float(ckpt["optimizer_states"][0]["param_groups"][0]["lr"])
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"cooldown.checkpoint={path} holds no optimizer state to continue ({err!r})") from err
    (plan,) = plan_stages([{"name": STAGE, "seq_len": stage.seq_len, "tokens": c.tokens, "weights": stage.weights}],
                          global_batch_tokens=job.train.global_batch_tokens,
                          micro_batch_tokens=job.train.micro_batch_tokens, world_size=job.trainer.world_size,
                          start_tokens=tokens)
    min_lr = min(job.optim.min_lr, lr)  # a checkpoint already below min_lr keeps its LR
    schedule = Schedule(lr=lr, min_lr=min_lr, warmup=0, total=plan.end_tokens, kind="wsd", decay=plan.tokens,
                        shape=c.shape or job.optim.decay_shape)
    return Branch(path, parent, stage, step, tokens, lr, plan, schedule, max(p.seq_len for p in plans))


def check_parent(parent: Path, recorded: dict | None, config: dict, checkpoint: Path) -> None:
    """The parent run must have this config's model, data, recipe, seed and global batch."""
    if recorded is None:
        return
    changes = [c for c in rundir.diff(recorded, config, ignore=("data.tokenizer_sha256",))
               if rundir.matches(c[0], PARENT_KEYS)]
    if changes:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:6])
        raise rundir.ConfigChanged(
            f"cooldown.checkpoint={checkpoint} belongs to {parent}, made with other values of {shown} (its -> "
            f"this config's): give the same overrides as that run (its config is {parent / rundir.CONFIG_FILE})")


def check_run_dir(branch: Branch, run_dir: Path) -> None:
    """The branch never writes into the run it branches from."""
    parent = branch.parent_dir
    if parent is None:
        return
    ours, theirs = run_dir.resolve(), parent.resolve()
    if ours == theirs or theirs in ours.parents or ours in theirs.parents:
        raise ValueError(f"run_dir={run_dir} for a cooldown of {parent}: a cooldown writes its own run directory, "
                         f"never inside the run it branches from (default: {branch.default_run_dir()})")


def pin_start(branch: Branch, run_dir: Path) -> Path:
    """The parent's checkpoint hard-linked into the branch (the parent may delete its own name meanwhile).

    Returns the path the branch starts from: the link, or the checkpoint itself where no link
    can be made (another file system); the parent's directory is never written either way.
    """
    target = run_dir / STAGE / START_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(branch.checkpoint, target)
    except FileExistsError:
        pass
    except OSError as err:
        log.info("cooldown: %s cannot be hard-linked into %s (%s): it is read where it is", branch.checkpoint,
                 target.parent, err)
        return branch.checkpoint
    return target


def describe(branch: Branch) -> str:
    """One line for the log and the plan."""
    where = f"{branch.parent_dir}" if branch.parent_dir else str(branch.checkpoint)
    return (f"cooldown of {where} from stage {branch.stage.name} step {branch.step:,} ({branch.tokens_seen:,} tokens, "
            f"lr {branch.lr:.3g}): {branch.schedule.shape} decay to {branch.schedule.min_lr:g} over "
            f"{branch.plan.tokens:,} tokens ({branch.plan.steps:,} steps)")


def parent_val_loss(branch: Branch) -> tuple[int, float] | None:
    """(tokens, val/loss) the parent logged last at or before the branch point, for the summary."""
    from danube.plot import read_scalars

    if branch.parent_dir is None:
        return None
    try:
        points = read_scalars(branch.parent_dir).get("val/loss", [])
    except FileNotFoundError:
        return None
    before = [(int(t), v) for t, v in points if t <= branch.tokens_seen]
    return before[-1] if before else None
