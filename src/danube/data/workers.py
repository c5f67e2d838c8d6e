"""What every DataLoader worker of danube does first."""

from __future__ import annotations

import signal

from danube.cluster import STOP_SIGNALS


def worker_init(worker_id: int) -> None:
    """Loader workers leave SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 to the training process.

    A scheduler that signals the whole process group (SLURM, a terminal's Ctrl-C) would
    otherwise kill the workers first, and the training process would die of "DataLoader
    worker killed" instead of stopping at its next optimizer step. A worker still exits when
    the training process does.
    """
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)
    for sig in STOP_SIGNALS:  # SIGUSR1/2's default action would end the worker
        signal.signal(sig, signal.SIG_IGN)
