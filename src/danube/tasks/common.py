"""What every task shares: the entry points' error boundary, run directories, the Trainer, hardware checks."""

from __future__ import annotations

import copy
import functools
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from danube import determinism
from danube.checkpoints import AtomicCheckpointIO
from danube.errors import USER_ERRORS, MissingHardware
from danube.model import DanubeConfig

log = logging.getLogger(__name__)

# bf16 dense peak per device, FLOP/s (NVIDIA datasheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


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


def current_names(cfg: DictConfig, renamed: Mapping[str, str], script: str) -> DictConfig:
    """``cfg`` with the keys renamed in this release under their new names; the old names still work, with a warning.

    ``renamed`` maps old to new (``{"init_from": "model_dir"}``). When an old key is set,
    its value goes to the new key and a warning names the new key; giving both with
    different values is an error. The returned copy has no old key, so the config a run
    records holds the new names only. Idempotent: a config without old keys is returned as is.
    """
    present = [old for old in renamed if old in cfg]
    if not present:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for old in present:
            new = renamed[old]
            value = None if OmegaConf.is_missing(cfg, old) else cfg[old]
            if value is not None:
                theirs = None if OmegaConf.is_missing(cfg, new) else cfg.get(new)
                if theirs is not None and theirs != value:
                    raise ValueError(f"{old}={value} and {new}={theirs}: {old} is the old name of {new}; give {new} only")
                log.warning("%s: %s= is deprecated and goes in the next release; use %s=%s", script, old, new, value)
                cfg[new] = value
            del cfg[old]
    return cfg


def current_recorded(recorded: dict | None, renamed: Mapping[str, str]) -> dict | None:
    """A run directory's recorded config with the old key names (written by earlier releases) under the new ones."""
    if not recorded:
        return recorded
    recorded = dict(recorded)
    for old, new in renamed.items():
        if old in recorded:
            value = recorded.pop(old)
            recorded.setdefault(new, value)
    return recorded


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` in the configs Hydra composes this run from; [] outside Hydra.

    Hydra's config loader knows its sources (the checkout's ``conf/``, or any other search
    path): no path is guessed from where this file lies.
    """
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    if not hydra.is_initialized():
        return []
    return sorted(hydra.config_loader().get_group_options(group))


def world_size(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.devices
    if devices in ("auto", -1):
        devices = torch.cuda.device_count() if trainer_cfg.accelerator in ("gpu", "cuda") else 1
    return int(devices) * int(trainer_cfg.get("num_nodes", 1))


TRAINER_PRECISIONS = ("32-true", "bf16-mixed")  # fp16 would need a loss scaler: danube clips unscaled gradients


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def danube_config(model, where: str = "model") -> DanubeConfig:
    """The one way from a ``model`` config (``conf/model/*.yaml`` and its overrides) to a :class:`DanubeConfig`.

    ``model`` is the composed ``model`` node, a preset loaded with ``OmegaConf.load``, or a
    plain mapping; a bad field or value is a ValueError naming ``where``.
    """
    try:
        return DanubeConfig.from_dict(_plain(model))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


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
            raise MissingHardware(
                f"trainer.accelerator={trainer_cfg.accelerator} but no CUDA device is visible on this machine "
                "(a GPU build of torch and a GPU are needed); use trainer=cpu here"
            )
        if isinstance(trainer_cfg.devices, int) and trainer_cfg.devices > torch.cuda.device_count():
            raise MissingHardware(
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
    # The model's own large products (MLP, lm_head): what its step could reach at best.
    c = int(cfg.model.n_embd)
    return max(measured_matmul_flops(c, int(n)) for n in (cfg.model.intermediate_size, cfg.model.vocab_size))


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


def trainer_strategy(trainer_cfg: DictConfig):
    strategy = trainer_cfg.strategy
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from danube.model.transformer import Block

        return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD", state_dict_type="full")
    return strategy


def deterministic(cfg: DictConfig) -> bool:
    """``train.deterministic`` for this run's accelerator (``auto``: on for CPU, off on GPUs)."""
    accelerator = str(cfg.trainer.accelerator)
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    return determinism.wanted(cfg.train.get("deterministic", "auto"), accelerator)


def check_numerics(cfg: DictConfig) -> None:
    """``train.deterministic`` and ``train.threads`` (both tasks' validation makes this check)."""
    determinism.wanted(cfg.train.get("deterministic", "auto"), "cpu")
    threads = cfg.train.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"train.threads={threads!r} must be >= 1 (an integer; null: torch's choice)")


def pin_numerics(cfg: DictConfig) -> dict[str, object]:
    """Apply ``train.deterministic``/``train.threads`` (checked by :func:`check_numerics`) before any compute;
    returns what the history records."""
    return determinism.configure(deterministic(cfg), cfg.train.get("threads"))


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
    limit_val_batches: int | float | None = None,
    purge_step: int | None = None,
    progress: str | None = None,
) -> L.Trainer:
    """The Trainer of one stage (pretraining) or one fine-tuning run.

    Lightning's own checkpointing is off: pretraining writes its checkpoints at step
    boundaries (:class:`danube.callbacks.StepBoundary`), fine-tuning writes model
    directories. ``purge_step`` hides TensorBoard events at and after that step from an
    earlier, killed attempt (a resumed run logs those steps again). ``progress`` names the
    progress display: a bar on a terminal, log lines otherwise.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from danube.callbacks import progress_callback

    callbacks = list(callbacks or [])
    bar = False
    if progress is not None:
        shown, bar = progress_callback(progress, int(cfg.train.get("log_every_n_steps", 10)))
        callbacks.append(shown)

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
        limit_val_batches=limit_val_batches,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(save_dir=str(logger_dir), name="", version=logger_version, default_hp_metric=False,
                                 purge_step=purge_step),
        callbacks=callbacks,
        enable_progress_bar=bar,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=cfg.train.get("log_every_n_steps", 10),
        default_root_dir=str(stage_dir),
        deterministic=deterministic(cfg),
        use_distributed_sampler=False,
    )


def run_entry_point(script: str, task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
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

    logs.setup(verbose=bool(cfg.get("verbose", False)))
    try:
        return task(cfg)
    except SIGTERMException:  # Lightning's own SIGTERM stop (fine-tuning), a SystemExit with code 0
        log.warning("%s: stopped by SIGTERM before the end; fine-tuning keeps no checkpoint: run the same command "
                    "again to start it over", script)
        sys.exit(143)
    except Interrupted as err:
        log.warning("%s: %s. Run the same command again to resume from it:\n  python %s", script, err,
                    shlex.join(sys.argv))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        log.warning("%s: interrupted; the run's newest checkpoint survives: run the same command again to resume",
                    script)
        sys.exit(130)
    except USER_ERRORS as err:
        if os.environ.get("DANUBE_TRACEBACK") or hydra_mode_is_multirun():
            raise
        print(f"{script}: error: {err} (DANUBE_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
