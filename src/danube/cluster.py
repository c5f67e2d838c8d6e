"""danube under a cluster scheduler (SLURM): who manages the processes, and requeueing a preempted job.

Lightning's own SLURM support (``SLURMEnvironment(auto_requeue=True)``, its default under
``srun``) answers the requeue signal by writing ``hpc_ckpt_N.ckpt`` in the middle of a step
and restoring from it on its own: outside danube's run directory and its guarantees (step
boundaries, the data position, ``weights_only`` loading, the lock, the history). danube
turns it off and handles the signal itself (:class:`danube.callbacks.StepBoundary`): a
checkpoint at the next optimizer step, then :func:`requeue`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess

log = logging.getLogger(__name__)

# What stops a run at its next optimizer step (:class:`danube.callbacks.SignalStop`), and what
# every DataLoader worker leaves to it: the last two are a scheduler's warning before a
# preemption or the time limit (SLURM's usual SIGUSR1, submitit's SIGUSR2), after which a
# SLURM job is requeued.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def slurm_job_id() -> str | None:
    """The SLURM job this process runs in (None: not a SLURM job)."""
    return os.environ.get("SLURM_JOB_ID") or None


def lightning_plugins() -> list:
    """The cluster environment for Lightning: SLURM's, without its own requeue, when SLURM manages the tasks."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def requeue_allowed(job_id: str) -> bool:
    """Whether the job may be requeued (``sbatch --requeue``, or the cluster's JobRequeue default)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and " Requeue=1" in f" {out.stdout}"


def requeue(job_id: str, *, resumes: bool = True) -> str:
    """Put the job back in the queue (it is stopped and starts again later); returns what happened, in words.

    ``resumes``: whether the job goes on from a checkpoint when it starts again (pretraining) or
    starts over (fine-tuning).
    """
    if shutil.which("scontrol") is None:
        return f"SLURM job {job_id} was not requeued: scontrol is not on PATH"
    if not requeue_allowed(job_id):
        return (f"SLURM job {job_id} does not allow a requeue (submit with sbatch --requeue); submit it again to "
                + ("resume" if resumes else "start over"))
    try:
        out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM job {job_id} was not requeued: {err}"
    if out.returncode:
        return f"SLURM job {job_id} was not requeued: {(out.stderr or out.stdout).strip()}"
    then = "resumes from this checkpoint" if resumes else "starts over"
    return f"SLURM job {job_id} requeued: it {then} when it starts again"
