"""What every task shares: run directories, the Trainer, atomic checkpoints, validation."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from danube.files import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

# bf16 dense peak per device, FLOP/s (NVIDIA datasheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target and rename it into place.

    A kill mid-save leaves the previous checkpoint under the same name untouched.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def hydra_mode_is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``run_dir`` if given; each multirun job's own directory; else ``runs/<name>``.

    ``name`` defaults to the chosen model preset (``runs/tiny``), so re-running the same
    command finds the same directory and resumes.
    """
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    from hydra.core.hydra_config import HydraConfig

    if hydra_mode_is_multirun():
        return Path(HydraConfig.get().runtime.output_dir)
    name = cfg.get("name")
    if not name:
        name = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
    return Path(cfg.paths.runs_dir) / str(name or "run")


def world_size(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.devices
    if devices in ("auto", -1):
        devices = torch.cuda.device_count() if trainer_cfg.accelerator in ("gpu", "cuda") else 1
    return int(devices) * int(trainer_cfg.get("num_nodes", 1))


TRAINER_PRECISIONS = ("32-true", "bf16-mixed")  # fp16 would need a loss scaler: danube clips unscaled gradients


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def check_precision_config(trainer_cfg: DictConfig, precision_cfg: DictConfig) -> None:
    """The precision and trainer options must go together (no hardware needed to tell)."""
    from danube.precision import fp8_backend

    precision = _plain(precision_cfg)
    if precision.get("trainer_precision") not in TRAINER_PRECISIONS:
        raise ValueError(f"precision.trainer_precision={precision.get('trainer_precision')!r}; "
                         f"allowed: {', '.join(TRAINER_PRECISIONS)}")
    backend = fp8_backend(precision)
    if backend is None:
        return
    if trainer_cfg.accelerator not in ("gpu", "cuda"):
        raise ValueError(f"precision=fp8 runs on GPUs; trainer.accelerator={trainer_cfg.accelerator} "
                         "(use trainer=h100x1 or h100x8, or precision=bf16)")
    if backend == "te" and "fsdp" in str(trainer_cfg.strategy):
        raise ValueError("precision=fp8 with backend te and an FSDP strategy is not supported; "
                         "use trainer=h100x8 (DDP) or precision.backend=torchao")


def check_trainer_config(trainer_cfg: DictConfig, precision_cfg: DictConfig) -> None:
    """Fail before any compute when the options do not go together or the hardware asked for is not here."""
    from danube.precision import check_fp8_available

    if precision_cfg.get("fp8"):
        check_fp8_available(_plain(precision_cfg))  # CUDA, the backend's package, the GPU: names what is missing
    check_precision_config(trainer_cfg, precision_cfg)
    if trainer_cfg.accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"trainer.accelerator={trainer_cfg.accelerator} but no CUDA device is visible; use trainer=cpu"
            )
        if isinstance(trainer_cfg.devices, int) and trainer_cfg.devices > torch.cuda.device_count():
            raise RuntimeError(
                f"trainer.devices={trainer_cfg.devices} but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    if precision_cfg.trainer_precision.startswith("bf16") and trainer_cfg.accelerator == "cpu":
        log.warning("bf16 on CPU is slow and only useful for testing; fp32 is the CPU default")


def peak_flops(cfg: DictConfig) -> float | None:
    """Per-device bf16 peak: configured, looked up for known GPUs, or measured on CPU."""
    if cfg.perf.get("peak_flops"):
        return float(cfg.perf.peak_flops)
    if cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return measured_matmul_flops()


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul throughput of this CPU: the ceiling MFU is measured against on CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def trainer_strategy(trainer_cfg: DictConfig):
    strategy = trainer_cfg.strategy
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from danube.model.transformer import Block

        return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD", state_dict_type="full")
    return strategy


def build_trainer(
    cfg: DictConfig,
    *,
    stage_dir: Path,
    logger_dir: Path,
    logger_version: str,
    max_steps: int,
    accumulate: int,
    val_check_interval: int | None,
    callbacks: list | None = None,
    checkpoint_every_n_steps: int | None = None,
) -> L.Trainer:
    """The Trainer of one stage (pretraining) or one fine-tuning run."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: F401
    from lightning.pytorch.loggers import TensorBoardLogger

    callbacks = list(callbacks or [])
    if checkpoint_every_n_steps:
        callbacks.append(
            ModelCheckpoint(
                dirpath=stage_dir / "checkpoints",
                filename="step{step:08d}",
                auto_insert_metric_name=False,
                every_n_train_steps=checkpoint_every_n_steps,
                save_top_k=2,
                monitor="step",
                mode="max",
                save_last=True,
            )
        )
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.get("num_nodes", 1),
        strategy=trainer_strategy(cfg.trainer),
        precision=cfg.precision.trainer_precision,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.optim.get("grad_clip"),
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.train.get("val_batches"),
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(save_dir=str(logger_dir), name="", version=logger_version, default_hp_metric=False),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        log_every_n_steps=cfg.train.get("log_every_n_steps", 10),
        default_root_dir=str(stage_dir),
        deterministic=False,
        use_distributed_sampler=False,
    )


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
