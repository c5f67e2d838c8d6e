"""Config groups every script shares: the devices, where files go, how sums are taken."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from danube import determinism
from danube.settings import check_ranges, setting

ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
STRATEGIES = ("auto", "ddp", "fsdp", "ddp_spawn")  # Lightning's names; fsdp is danube's FSDP set-up


@dataclass
class TrainerConfig:
    """``trainer``: where the run computes (conf/trainer/*.yaml); everything else about the Trainer is derived."""

    accelerator: str = setting("cpu", "where the run computes", choices=ACCELERATORS)
    devices: Any = setting(1, "devices per node: a positive integer, or auto (every visible GPU)")
    num_nodes: int = setting(1, "machines, each with `devices` devices", min=1)
    strategy: str = setting(
        "auto", "how devices share the work (fsdp: FSDP2, full sharding, one unit per block; runs on CPU too)",
        choices=STRATEGIES)
    collective_timeout_s: int = setting(
        1800, "seconds a rank waits in a collective before it gives up: how long the others go on after a rank or "
        "node died where the backend cannot tell (NCCL); gloo notices a closed connection at once", min=10)

    def __post_init__(self) -> None:
        check_ranges(self, "trainer")
        if self.devices not in ("auto", -1) and (isinstance(self.devices, bool) or not isinstance(self.devices, int)
                                                 or self.devices < 1):
            raise ValueError(f"trainer.devices={self.devices!r} must be >= 1 (an integer) or auto")

    @property
    def on_gpu(self) -> bool:
        return self.accelerator in ("gpu", "cuda")

    @property
    def world_size(self) -> int:
        """Processes of the run, all nodes together (``devices: auto`` counts the visible GPUs)."""
        devices = self.devices
        if devices in ("auto", -1):
            import torch

            devices = torch.cuda.device_count() if self.on_gpu else 1
        return int(devices) * self.num_nodes


@dataclass
class PathsConfig:
    """``paths``: where data and runs live (conf/paths/default.yaml; DANUBE_HOME moves them all)."""

    root_dir: str = setting(".", "the folder data_dir and runs_dir lie under (${oc.env:DANUBE_HOME,.})")
    data_dir: str = setting("./data", "the embedded sample data and its tokenizer are made here")
    runs_dir: str = setting("./runs", "run directories: runs/NAME; evaluation results: runs/eval/")


@dataclass
class NumericsConfig:
    """How floating-point sums are taken (:mod:`danube.determinism`); part of ``train`` in both training scripts."""

    deterministic: Any = setting("auto", "same config + machine + seed -> same bits; auto: on for CPU runs",
                                 choices=determinism.CHOICES)
    threads: int | None = setting(None, "intra-op threads (torch.set_num_threads); null: torch's choice, recorded",
                                  min=1)

    def __post_init__(self) -> None:
        check_ranges(self, "train")  # a subclass's own fields too: it is the whole `train` section

    def pin(self, trainer: TrainerConfig) -> dict[str, object]:
        """Apply the settings before any compute (MKL reads its mode at its first call); returns what history records."""
        return determinism.configure(self.deterministic_on(trainer), self.threads)

    def deterministic_on(self, trainer: TrainerConfig) -> bool:
        """``deterministic`` for this run's accelerator (``auto``: on for CPU, off on GPUs)."""
        accelerator = trainer.accelerator
        if accelerator == "auto":
            import torch

            accelerator = "gpu" if torch.cuda.is_available() else "cpu"
        return determinism.wanted(self.deterministic, "cpu" if accelerator == "cpu" else "gpu")
