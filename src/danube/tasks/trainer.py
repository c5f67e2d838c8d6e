"""The Lightning Trainer of a pretraining stage or a fine-tuning run, and the checks of the hardware it asks for."""

from __future__ import annotations

import datetime
import functools
import logging
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from danube import cluster
from danube.checkpoints import AtomicCheckpointIO
from danube.config import DanubeConfig, PrecisionConfig, TrainerConfig
from danube.errors import MissingHardware

log = logging.getLogger(__name__)

# bf16 dense peak per device, FLOP/s (NVIDIA datasheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def check_hardware(trainer: TrainerConfig, precision: PrecisionConfig) -> None:
    """Fail before any compute when the options do not go together or the hardware asked for is not here."""
    from danube.precision import check_fp8_available

    if precision.fp8:
        check_fp8_available(precision)  # CUDA, the backend's package, the GPU: names what is missing
        if not trainer.on_gpu:
            raise ValueError(f"precision=fp8 runs on GPUs; trainer.accelerator={trainer.accelerator} "
                             "(use trainer=h100x1 or h100x8, or precision=bf16)")
        if precision.backend == "te" and trainer.strategy == "fsdp":
            raise ValueError("precision=fp8 with backend te and trainer.strategy=fsdp is not supported "
                             "(Transformer Engine's layers under FSDP2 sharding are untested); "
                             "use trainer=h100x8 (DDP) or precision.backend=torchao")
    if trainer.on_gpu:
        if not torch.cuda.is_available():
            raise MissingHardware(
                f"trainer.accelerator={trainer.accelerator} but no CUDA device is visible on this machine "
                "(a GPU build of torch and a GPU are needed); use trainer=cpu here"
            )
        if isinstance(trainer.devices, int) and trainer.devices > torch.cuda.device_count():
            raise MissingHardware(f"trainer.devices={trainer.devices} but this machine has "
                                  f"{torch.cuda.device_count()} GPU(s)")
    if precision.trainer_precision.startswith("bf16") and trainer.accelerator == "cpu":
        log.warning("bf16 on CPU is slow and only useful for testing; fp32 is the CPU default")


def peak_flops(configured: float | None, trainer: TrainerConfig, model: DanubeConfig) -> float | None:
    """Per-device bf16 peak: configured, looked up for known GPUs, or measured on CPU."""
    if configured:
        return configured
    if trainer.on_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    # The model's own large products (MLP, lm_head): what its step could reach at best.
    return max(measured_matmul_flops(model.n_embd, n) for n in (model.intermediate_size, model.vocab_size))


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(k: int = 1024, n: int = 1024, m: int | None = None, repeats: int = 9) -> float:
    """fp32 FLOP/s of ``(m, k) @ (k, n)`` on this CPU: the ceiling MFU is measured against on CPU.

    Measured once per process and shape (cached, so every stage of a run uses the same
    ceiling): warm-up until the thread pool and caches have settled (3 products and at
    least 0.2 s), then the median of ``repeats`` timed products, which one slow product
    does not move. ``m`` (rows, i.e. tokens) defaults to what makes one product ~2 GFLOP,
    within [256, 4096]. Timing a single 1024^3 product per stage swung with the load and
    put CPU MFU above 1.
    """
    if m is None:
        m = max(256, min(4096, int(1e9 // (k * n))))
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    start, warm = time.perf_counter(), 0
    while warm < 3 or time.perf_counter() - start < 0.2:
        torch.mm(a, b, out=out)
        warm += 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times)


def strategy(trainer: TrainerConfig):
    """Lightning's strategy for ``trainer.strategy`` (fsdp: FSDP2, :mod:`danube.lit.sharded`).

    Every distributed strategy waits ``trainer.collective_timeout_s`` in a collective, not
    Lightning's default of 30 minutes, so a rank whose peer died stops in a known time.
    """
    timeout = datetime.timedelta(seconds=trainer.collective_timeout_s)
    if trainer.strategy == "fsdp":
        from danube.lit.sharded import ShardedDataParallel  # FSDP2: runs on CPU (gloo) as on GPUs

        return ShardedDataParallel(trainer.world_size, timeout)
    if trainer.strategy in ("ddp", "ddp_spawn") or (trainer.strategy == "auto" and trainer.world_size > 1):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn" if trainer.strategy == "ddp_spawn" else "popen", timeout=timeout)
    return trainer.strategy


def build_trainer(
    trainer: TrainerConfig,
    precision: PrecisionConfig,
    *,
    grad_clip: float | None,
    log_every_n_steps: int,
    deterministic: bool,
    stage_dir: Path,
    logger_dir: Path,
    logger_version: str,
    max_steps: int,
    accumulate: int,
    val_check_interval: int | None,
    callbacks: list | None = None,
    limit_val_batches: int | float | None = None,
    purge_step: int | None = None,
    progress: str | None = None,
    validate_first: bool = False,
) -> L.Trainer:
    """The Trainer of one stage (pretraining) or one fine-tuning run.

    Lightning's own checkpointing is off: pretraining writes its checkpoints at step
    boundaries (:class:`danube.callbacks.StepBoundary`), fine-tuning writes model
    directories. ``purge_step`` hides TensorBoard events at and after that step from an
    earlier, killed attempt (a resumed run logs those steps again). ``progress`` names the
    progress display: a bar on a terminal, log lines otherwise. ``validate_first``: a whole
    validation pass before the first step (Lightning's sanity check over every batch).
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from danube.callbacks import progress_callback

    callbacks = list(callbacks or [])
    bar = False
    if progress is not None:
        shown, bar = progress_callback(progress, log_every_n_steps)
        callbacks.append(shown)

    return L.Trainer(
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=strategy(trainer),
        precision=precision.trainer_precision,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=grad_clip,
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=limit_val_batches,
        num_sanity_val_steps=-1 if validate_first else 0,
        logger=TensorBoardLogger(save_dir=str(logger_dir), name="", version=logger_version, default_hp_metric=False,
                                 purge_step=purge_step),
        callbacks=callbacks,
        enable_progress_bar=bar,
        plugins=[AtomicCheckpointIO(), *cluster.lightning_plugins()],
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=log_every_n_steps,
        default_root_dir=str(stage_dir),
        deterministic=deterministic,
        use_distributed_sampler=False,
    )
