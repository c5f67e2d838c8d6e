"""Lightning callbacks shared by the tasks: the pretraining step boundary and the progress bar."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from danube import cluster
from danube.checkpoints import point_last, prune, step_checkpoints, step_file

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """A run stopped by a signal: after saving a checkpoint at an optimizer-step boundary, or at once.

    ``at_once``: a second Ctrl-C stopped the run where it was; ``checkpoint`` is then the newest one
    written before, which the next run resumes from. ``requeue``: the SLURM job to requeue once this
    process is out of the trainer (every collective done: the requeue ends the job's tasks at
    once).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, *, at_once: bool = False,
                 requeue: str | None = None, resumable: bool = True) -> None:
        self.signum, self.step, self.checkpoint, self.at_once = signum, step, checkpoint, at_once
        self.requeue, self.resumable = requeue, resumable
        name = signal.Signals(signum).name
        if not resumable:
            where = "; fine-tuning keeps no checkpoint: the next run starts it over"
        elif checkpoint:
            where = f"; the next run resumes from {checkpoint} (step {step})" if at_once else \
                f"; the checkpoint {checkpoint} holds step {step}"
        else:
            where = "; no checkpoint was written yet: the next run starts the stage over" if at_once else ""
        text = f"stopped at once by a second {name}{where}" if at_once else \
            f"stopped by {name} at optimizer step {step}{where}"
        super().__init__(text)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended


_AT_ONCE: Interrupted | None = None  # a second Ctrl-C's stop, once asked for


def stopped_at_once() -> Interrupted | None:
    """The stop a second Ctrl-C asked for, if one did.

    Ending the other ranks can make this one fail in a collective ("Connection closed by
    peer") before the stop's own exception is raised: that failure is this stop.
    """
    return _AT_ONCE


_LEAVING = False  # a stop was agreed and its checkpoint written: this process is on its way out


@contextlib.contextmanager
def sigterm_absorbed_when_leaving() -> Iterator[None]:
    """SIGTERM as before, except once a stop is under way: then it is absorbed until the process exits.

    After an agreed stop every rank leaves with the stop's exit code, and rank zero may still have a
    SLURM requeue to ask for. srun (``--kill-on-bad-exit``) sends SIGTERM to the tasks still running as
    soon as one has exited non-zero; without this, the slowest rank -- rank zero, asking SLURM about
    the requeue -- died of it, with exit 143 and no requeue. Lightning restores the handler found at
    the start of ``fit`` when it tears down, so it is installed around the whole run.
    """
    global _LEAVING
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame) -> None:
        if _LEAVING:
            return
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # what SIGTERM did before: the default action, or nothing

    _LEAVING = False
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        # On the way out: ignored at the C level, which Python keeps through its finalization (a Python
        # handler is reset to the default there, and the interpreter's shutdown can take seconds).
        signal.signal(signal.SIGTERM, signal.SIG_IGN if _LEAVING else previous)


class SignalStop(Callback):
    """A stop at the next optimizer step when SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 arrives, agreed by every rank.

    SIGUSR1 is SLURM's usual warning before a preemption or the time limit (``sbatch
    --signal=USR1@N``), SIGUSR2 the one submitit asks for (Hydra's ``submitit_slurm``
    launcher, which runs each job of a sweep as a SLURM job). At the first
    optimizer-step boundary after a signal, :meth:`at_boundary` writes what the run keeps
    (this class: nothing; :class:`StepBoundary`: a checkpoint), then :class:`Interrupted` is
    raised; after either warning in a SLURM job, rank zero's asks for a requeue of the job
    (:func:`danube.cluster.requeue`, once out of the trainer). A second SIGINT stops at once
    (processes the launcher started are ended with it, so none is left waiting in a
    collective). On several devices the ranks agree on the stop with one all-reduce of a
    scalar per step. Fine-tuning uses this class as it is: it keeps no checkpoint and a
    stopped run starts over.
    """

    resumable = False  # whether a stopped run goes on from what it kept
    stop_note = ""  # what the stop keeps, for the warning

    def __init__(self) -> None:
        self.signum: int | None = None
        self.last_saved: Path | None = None
        self._step = -1
        self._saved_step = -1
        self._handlers: dict[int, Any] = {}
        self._keep: set[int] = set()  # handlers left in place when the others are restored
        self._trainer = None

    # -- signals -------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self._stop_at_once(signum)
        if self.signum is None:
            log.warning("received %s: stopping after the current optimizer step%s (press Ctrl-C again to stop at "
                        "once)", signal.Signals(signum).name, self.stop_note)
        self.signum = self.signum or signum

    def newest_kept(self) -> tuple[int, Path | None]:
        """The step and file a run stopped at once resumes from (this class: none)."""
        return 0, None

    def _stop_at_once(self, signum: int) -> None:
        """Asked twice: stop where the run is, ending the processes the launcher started with this one."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third Ctrl-C must not interrupt the way out
        trainer = self._trainer
        step, newest = self.newest_kept()
        global _AT_ONCE
        _AT_ONCE = Interrupted(signum, step, newest, at_once=True, resumable=self.resumable)
        launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
        if launcher is not None and hasattr(launcher, "procs") and launcher.procs:
            launcher.kill(signal.SIGKILL)
        raise _AT_ONCE

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in cluster.STOP_SIGNALS:
            self._handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore(self) -> None:
        for sig, handler in self._handlers.items():
            if sig in self._keep:
                continue
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._handlers = {}

    def _stop_agreed(self, trainer) -> int | None:
        if trainer.world_size == 1:
            return self.signum
        flag = torch.tensor(float(self.signum or 0), device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(flag, reduce_op="max"))  # any rank signalled: all stop
        return agreed or None

    # -- hooks ---------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed stage starts on a boundary it has already handled.
        self._step = self._saved_step = trainer.global_step
        self._trainer = trainer
        self._install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step:
            return  # in the middle of gradient accumulation
        self._step = step
        stop = self.at_boundary(trainer, step)
        if stop:
            self.leave(trainer, stop, step)

    def at_boundary(self, trainer, step: int) -> int | None:
        """The work of one optimizer-step boundary; returns the agreed stop signal (None: go on)."""
        return self._stop_agreed(trainer)

    def leave(self, trainer, stop: int, step: int) -> None:
        global _LEAVING
        _LEAVING = True  # from here a SIGTERM changes nothing (sigterm_absorbed_when_leaving)
        self._keep = {signal.SIGTERM}  # Lightning's handler would broadcast to ranks that are gone
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        job = cluster.slurm_job_id()
        requeue = job if stop in cluster.REQUEUE_SIGNALS and job is not None and trainer.is_global_zero else None
        raise Interrupted(stop, step, self.last_saved, requeue=requeue, resumable=self.resumable)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()


class StepBoundary(SignalStop):
    """Everything that happens between two optimizer steps of a pretraining stage, in this order.

    1. validation, every ``val_every_n_steps`` steps and at the stage's last step;
    2. downstream evaluation (lm-eval tasks), every ``eval_every_n_steps`` steps and at the
       stage's last step;
    3. a checkpoint, every ``every_n_steps`` steps and at the stage's last step;
    4. a stop, when a signal arrived since the last boundary (:class:`SignalStop`): a
       checkpoint is written (if step 3 wrote none), then :class:`Interrupted` is raised.

    Nothing happens in the middle of gradient accumulation, so every checkpoint resumes
    exactly, and one written after its step's validation and evaluation makes a kill during
    them repeat them rather than lose them (a resume never repeats those of the step it
    resumes from). A run stopped at once by a second Ctrl-C resumes from the newest
    checkpoint written before.

    Args:
        dirpath: the stage's ``checkpoints/`` folder.
        every_n_steps: checkpoint interval (0: only at the last step and on a stop).
        keep: step checkpoints kept (the newest); ``last.ckpt`` links to the newest.
        last_step: the stage's last optimizer step (its ``max_steps``).
        validate: runs one validation and returns its mean loss (None: no validation data).
        val_every_n_steps: validation interval (None: no validation).
        evaluate: runs one downstream evaluation and logs it (every rank calls it).
        eval_every_n_steps: its interval (None: no downstream evaluation).
    """

    stop_note = ", with a checkpoint"
    resumable = True

    def __init__(self, dirpath: Path, *, every_n_steps: int, keep: int, last_step: int,
                 validate: Callable[[], float | None] | None = None, val_every_n_steps: int | None = None,
                 evaluate: Callable[[], None] | None = None, eval_every_n_steps: int | None = None) -> None:
        super().__init__()
        self.dirpath, self.every, self.keep, self.last_step = Path(dirpath), every_n_steps, keep, last_step
        self.validate, self.val_every = validate, val_every_n_steps
        self.evaluate, self.eval_every = evaluate, eval_every_n_steps
        self.last_val: tuple[int, float] | None = None  # (step, val loss)

    def newest_kept(self) -> tuple[int, Path | None]:
        if self.last_saved is not None:
            return self._saved_step, self.last_saved
        # none written by this process: the one it resumed from, if any (newest first)
        return next(iter(step_checkpoints(self.dirpath)), (0, None))

    def at_boundary(self, trainer, step: int) -> int | None:
        last = step >= self.last_step
        if self.validate is not None and self.val_every and (step % self.val_every == 0 or last):
            loss = self.validate()
            if loss is not None:
                self.last_val = (step, loss)
        if self.evaluate is not None and self.eval_every and (step % self.eval_every == 0 or last):
            self.evaluate()
        stop = self._stop_agreed(trainer)
        if stop or last or (self.every and step % self.every == 0):
            self.save(trainer)
        return stop

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, trainer) -> Path:
        """Write ``stepN.ckpt`` (all ranks take part), point ``last.ckpt`` at it, keep the newest ``keep``."""
        step = trainer.global_step
        path = self.dirpath / step_file(step)
        if self._saved_step == step and path.is_file():
            return path
        for logger in trainer.loggers:  # events up to this step survive a kill with the checkpoint
            logger.save()
            if hasattr(logger.experiment, "flush"):
                logger.experiment.flush()
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            point_last(self.dirpath, path)
            prune(self.dirpath, self.keep)
        self._saved_step, self.last_saved = step, path
        return path


def mean_validation_loss(trainer, loader, step_fn: Callable[[Any, int], torch.Tensor]) -> float | None:
    """Mean of ``step_fn(batch, i)`` over ``loader`` (all ranks' batches weighted alike); None if it is empty.

    ``step_fn`` is the strategy's ``validation_step``, so the batches see the same precision
    context and model wrapping (DDP, FSDP) as training.
    """
    module = trainer.lightning_module
    was_training = module.training
    module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=trainer.strategy.root_device)
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                batch = trainer.strategy.batch_to_device(batch)
                total[0] += step_fn(batch, i).double()
                total[1] += 1
    finally:
        module.train(was_training)
    if trainer.world_size > 1:
        total = trainer.strategy.reduce(total, reduce_op="sum")
    return None if total[1] == 0 else float(total[0] / total[1])


class StageProgressBar(TQDMProgressBar):
    """Counts optimizer steps towards the run's ``max_steps``: ``seq256 (seq 256): 12/40``.

    Lightning's bar counts the loader's batches of one epoch: under gradient accumulation
    those are micro-batches, measured against a total that is neither the micro-batches
    nor the steps of the run (fine-tuning showed ``128/16``, full after an eighth of it),
    and a streaming loader has no length at all. Both tasks plan in optimizer steps
    (``max_steps``), so the bar does too; a resumed run starts at its step.
    """

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return super().total_train_batches

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.initial = trainer.global_step  # a resumed run's rate counts only the steps it makes
        bar.n = trainer.global_step
        bar.set_description(self.description)  # not "Epoch 0": a run here is steps, not epochs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or step == bar.n:
            return  # a micro-batch inside an accumulation: no step made
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class StepLines(Callback):
    """What the progress bar shows, as one log line every ``every`` optimizer steps (and the first and last).

    Used when the output is not a terminal (a file, a pipe, a CI log), where a bar's
    ``\r`` redraws pile up into hundreds of KB of frames.
    """

    def __init__(self, description: str, every: int) -> None:
        self.description, self.every = description, max(1, int(every))
        self._step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step:
            return  # inside an accumulation
        self._step = step
        if not trainer.is_global_zero or (step % self.every and step != 1 and step != trainer.max_steps):
            return
        shown = ", ".join(f"{k} {_short(float(v))}" for k, v in trainer.progress_bar_metrics.items() if k != "v_num")
        log.info("%s: step %d/%d%s", self.description, step, trainer.max_steps, f", {shown}" if shown else "")


def _short(value: float) -> str:
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def progress_callback(description: str, every: int) -> tuple[Callback, bool]:
    """A bar on a terminal, log lines elsewhere; and whether Lightning's own bar is enabled."""
    from danube.logs import console_is_terminal

    if console_is_terminal():
        return StageProgressBar(description), True
    return StepLines(description, every), False
