"""Next-token pretraining as a LightningModule.

Learning rate, logging and stage hand-offs are all keyed on ``tokens_seen``, the tokens
consumed by all devices together, which the checkpoint carries from stage to stage.
TensorBoard scalars use tokens seen as their x-axis (the report's Figure 1).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from danube.lit.clipping import ClipsGradients
from danube.lit.sharded import load_full_state
from danube.losses import chunked_cross_entropy
from danube.model import Danube, DanubeConfig, build_model
from danube.model.sharding import shard_model
from danube.model.transformer import linear_no_bias
from danube.optim import adamw
from danube.config import OptimConfig
from danube.precision import PrecisionConfig, convert_to_float8, fp8_autocast, te_linear_factory
from danube.schedule import Schedule

log = logging.getLogger(__name__)


class PretrainModule(ClipsGradients):
    """Danube pretraining: AdamW, a token-keyed LR schedule, chunked cross-entropy.

    Args:
        model: the architecture (a ``DanubeConfig``, or its fields; recorded in hparams as fields).
        optim: AdamW and the LR schedule (an ``OptimConfig``, or its fields; recorded as fields).
        total_tokens: tokens of the whole recipe (all stages): where ``optim``'s schedule ends.
        schedule: the LR schedule in tokens, given whole (a cooldown's); default: ``optim``'s over
            ``total_tokens`` (:meth:`danube.config.OptimConfig.schedule_over`).
        seq_len: this stage's sequence length (logged as ``train/seq_len``).
        stage: this stage's name (recorded in checkpoints, so ``resume=PATH`` knows its stage).
        precision: a ``PrecisionConfig`` or its fields (``fp8: true``: the block projections in FP8
            through ``backend`` ``te`` or ``torchao``, see :mod:`danube.precision`).
        peak_flops: per-device peak for ``perf/mfu`` (None: not logged).
        init_from: a checkpoint of the previous stage to start from (weights, optimizer, tokens),
            or a danube model directory (weights only: fresh optimizer, tokens 0).
        seed: the initial weights are drawn from this seed alone, whatever the process did before
            (on any number of devices the run starts from the same weights).
    """

    def __init__(
        self,
        model: DanubeConfig | dict,
        optim: OptimConfig | dict,
        *,
        total_tokens: int | None = None,
        seq_len: int,
        schedule: Schedule | dict | None = None,
        stage: str | None = None,
        precision: PrecisionConfig | dict | None = None,
        log_every_n_steps: int = 10,
        loss_chunk_tokens: int = 4096,
        compile: bool = False,
        activation_checkpointing: bool = False,
        peak_flops: float | None = None,
        source_names: list[str] | None = None,
        init_from: str | None = None,
        tokenizer_checksum: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optim", "precision", "schedule"])
        self.config = model if isinstance(model, DanubeConfig) else DanubeConfig.from_dict(model)
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**optim)
        self.precision = precision if isinstance(precision, PrecisionConfig) else PrecisionConfig(**(precision or {}))
        # Plain values in hparams: checkpoints load with weights_only.
        if schedule is None:
            if total_tokens is None:
                raise TypeError("PretrainModule needs total_tokens or a schedule")
            schedule = self.optim.schedule_over(int(total_tokens))
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(**schedule)
        self.hparams.update(model=self.config.to_dict(), optim=dataclasses.asdict(self.optim),
                            precision=dataclasses.asdict(self.precision), schedule=dataclasses.asdict(self.schedule))
        self.model = None
        self.tokens_seen = 0
        self.fp8_backend = self.precision.fp8_backend
        self.fp8 = self.fp8_backend == "te"  # Transformer Engine layers run under its fp8_autocast
        self._grad_norm: torch.Tensor | None = None  # before clipping, at the last optimizer step
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._source_tokens: torch.Tensor | None = None  # this interval, this rank
        self.source_tokens_total = [0] * len(source_names or [])  # all ranks, since the first stage
        self._last_log: tuple[float, int] | None = None
        self.last_val_tokens: int | None = None  # tokens seen at the last logged validation
        self.last_train_loss: float | None = None  # the last logged train/loss
        self._warned_ceiling = False

    # -- model ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        linear = te_linear_factory(self.precision) if self.fp8 else linear_no_bias
        # Outside a Trainer (benchmarks, notebooks) build where the module was moved to.
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        cuda = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.hparams.seed)
            if self.fp8:
                # TE layers keep FP8 scaling state outside parameters; build them on the device
                # directly rather than through meta + to_empty.
                with torch.device(device):
                    self.model = Danube(self.config, linear)
                self.model.init_weights()
            else:
                self.model = build_model(self.config, device=device, linear=linear)
        if self.fp8_backend == "torchao":
            convert_to_float8(self.model, self.precision)  # before compile: it traces Float8Linear
        if self.hparams.activation_checkpointing:
            self.model.set_gradient_checkpointing(True)
        if self.hparams.compile:
            for layer in self.model.model.layers:
                layer.compile()  # in place: parameter names (and checkpoints) stay the same
        mesh = getattr(self, "_device_mesh", None)  # set by Lightning's ModelParallelStrategy (trainer.strategy=fsdp)
        if mesh is not None:
            shard_model(self.model, mesh["data_parallel"])

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
        with fp8_autocast(self.fp8, self.precision):
            hidden = self.model(tokens[:, :-1], hidden=True)  # (B, T, C)
        return chunked_cross_entropy(hidden, self.model.lm_head.weight, tokens[:, 1:], self.hparams.loss_chunk_tokens)

    # -- optimisation --------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        # fused "auto" is safe here: danube clips the gradients itself (configure_gradient_clipping).
        return adamw(self.model, lr=self.lr_now(), betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                     fused=o.fused)

    def lr_now(self) -> float:
        """The LR at the tokens seen so far (:class:`danube.schedule.Schedule`)."""
        return self.schedule(self.tokens_seen)

    def on_before_optimizer_step(self, optimizer) -> None:
        # tokens_seen already counts this step's batch (see danube.schedule.Schedule).
        lr = self.lr_now()
        for group in optimizer.param_groups:
            group["lr"] = lr

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)  # backward of the last micro-batch, clipping, the step
        # The step's metrics are written here, after its clipping (train/grad_norm) and before
        # the step boundary's checkpoint (danube.callbacks.StepBoundary, in on_train_batch_end):
        # a run killed right after that checkpoint has already logged the step it resumes after.
        step = self.global_step + 1  # Lightning counts the step once this hook returns
        # Every stage logs its first and last step besides every n-th, so a stage shorter than
        # the interval still has its points and each curve reaches the stage's end.
        if step % self.hparams.log_every_n_steps == 0 or step == 1 or step == self.trainer.max_steps:
            self._log_train_metrics(step)

    # -- steps ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = batch["tokens"]
        loss = self.loss(tokens)
        self.tokens_seen += tokens.shape[0] * (tokens.shape[1] - 1) * self.trainer.world_size
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_count += 1
        if "source" in batch and self.hparams.source_names:
            counts = torch.bincount(batch["source"], minlength=len(self.hparams.source_names))
            counts = counts * (tokens.shape[1] - 1)
            self._source_tokens = counts if self._source_tokens is None else self._source_tokens + counts
        return loss

    def on_train_start(self) -> None:
        # A point at the stage's first token, so that the sequence-length step is drawn at the
        # boundary (the previous stage logged its last step at the same x), not at this
        # stage's first logging step.
        if self.logger is not None and self.global_step == 0:
            self.logger.log_metrics({"train/seq_len": float(self.hparams.seq_len), "train/lr": self.lr_now()},
                                    step=self.tokens_seen)

    def _log_train_metrics(self, step: int) -> None:
        """Reduce across ranks and write one point per metric at x = tokens seen."""
        if self._loss_sum is None:
            return
        loss = self.trainer.strategy.reduce(self._loss_sum / self._loss_count, reduce_op="mean")
        metrics: dict[str, float] = {
            "train/loss": float(loss),
            "train/lr": self.optimizers().optimizer.param_groups[0]["lr"],
            "train/seq_len": float(self.hparams.seq_len),
            "train/tokens_seen": float(self.tokens_seen),
            "train/step": float(step),
        }
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = float(self._grad_norm)
        if self.hparams.source_names:
            self._flush_source_tokens()
            for name, count in zip(self.hparams.source_names, self.source_tokens_total):
                metrics[f"data/tokens/{name}"] = float(count)
        now = time.perf_counter()
        if self._last_log is not None:
            seconds, tokens = now - self._last_log[0], self.tokens_seen - self._last_log[1]
            if seconds > 0 and tokens > 0:
                tps = tokens / seconds
                metrics["perf/tokens_per_sec"] = tps
                metrics["perf/tokens_per_sec_per_device"] = tps / self.trainer.world_size
                if self.hparams.peak_flops:
                    flops = self.config.flops_per_token(self.hparams.seq_len) * tps / self.trainer.world_size
                    metrics["perf/mfu"] = flops / self.hparams.peak_flops
                    self._warn_above_ceiling(flops)
        self._last_log = (now, self.tokens_seen)
        self._loss_sum, self._loss_count = None, 0
        self.last_train_loss = metrics["train/loss"]
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=self.tokens_seen)
        # The console bar shows these at the logging interval: no host sync per micro-batch.
        self.log("train/loss", metrics["train/loss"], prog_bar=True, logger=False, rank_zero_only=True)
        self.log("train/lr", metrics["train/lr"], prog_bar=True, logger=False, rank_zero_only=True)
        if "perf/tokens_per_sec" in metrics:
            self.log("tokens/s", metrics["perf/tokens_per_sec"], prog_bar=True, logger=False, rank_zero_only=True)

    def _warn_above_ceiling(self, flops: float) -> None:
        """MFU above 1 is logged as measured, never silently: the ceiling, not the step, is wrong."""
        if flops <= self.hparams.peak_flops or self._warned_ceiling:
            return
        self._warned_ceiling = True
        log.warning(
            "perf/mfu=%.2f: the step reached %.1f GFLOP/s, above the peak of %.1f GFLOP/s it is measured against "
            "(perf.peak_flops, or on CPU a matmul of the model's shapes timed at start while the machine may have "
            "been busier); MFU here reads high. Set perf.peak_flops=FLOP/s for a fixed ceiling.",
            flops / self.hparams.peak_flops, flops / 1e9, self.hparams.peak_flops / 1e9,
        )

    def _flush_source_tokens(self) -> None:
        """Add this interval's per-source tokens, summed over ranks, to the running totals (collective)."""
        if self._source_tokens is None:
            return
        totals = self.trainer.strategy.reduce(self._source_tokens.float(), reduce_op="sum")
        self._source_tokens = None
        for i, count in enumerate(totals.tolist()):
            self.source_tokens_total[i] += int(count)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One validation batch's mean loss; :class:`danube.callbacks.StepBoundary` runs the loop and averages."""
        return self.loss(batch["tokens"])

    def log_validation(self, loss: float) -> None:
        """Write ``val/loss`` at the tokens seen so far (rank zero's logger; the loss is already all-reduced)."""
        if self.logger is not None:
            self.logger.log_metrics({"val/loss": loss}, step=self.tokens_seen)
        self.last_val_tokens = self.tokens_seen
        if self.trainer.is_global_zero:
            log.info("%s tokens: val/loss %.4f", f"{self.tokens_seen:,}", loss)

    def log_downstream(self, scalars: dict[str, float], seconds: float) -> None:
        """Write ``eval/<task>/<metric>`` and ``perf/eval_seconds`` at the tokens seen; keep the time out of tokens/s.

        Every rank calls it (the clock of each moves on); only rank zero has a logger.
        """
        if self._last_log is not None:  # perf/tokens_per_sec counts training time only
            self._last_log = (self._last_log[0] + seconds, self._last_log[1])
        if self.logger is not None:
            self.logger.log_metrics({**scalars, "perf/eval_seconds": seconds}, step=self.tokens_seen)
        if self.trainer.is_global_zero:
            shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in scalars.items())
            log.info("%s tokens: %s (%.1fs)", f"{self.tokens_seen:,}", shown, seconds)

    # -- checkpoints and stages ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._flush_source_tokens()  # every rank dumps the checkpoint, so the reduce is safe
        checkpoint["danube"] = {
            "tokens_seen": self.tokens_seen,
            "model_config": self.config.to_dict(),
            "seq_len": self.hparams.seq_len,
            "stage": self.hparams.stage,
            "tokenizer_checksum": self.hparams.tokenizer_checksum,
            "source_tokens": dict(zip(self.hparams.source_names or [], self.source_tokens_total)),
            "world_size": self.trainer.world_size,
            "accumulate": self.trainer.accumulate_grad_batches,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_tokenizer(checkpoint, "the checkpoint being resumed")
        self._restore_counters(checkpoint)
        if self._trainer is not None:
            recount_micro_batches(checkpoint, self.trainer.accumulate_grad_batches, self.trainer.world_size)

    def _restore_counters(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint["danube"]["tokens_seen"])
        saved = checkpoint["danube"].get("source_tokens", {})
        self.source_tokens_total = [int(saved.get(n, 0)) for n in self.hparams.source_names or []]

    def _check_tokenizer(self, checkpoint: dict[str, Any], what: str) -> None:
        theirs, ours = checkpoint["danube"].get("tokenizer_checksum"), self.hparams.tokenizer_checksum
        if theirs and ours and theirs != ours:
            raise ValueError(
                f"{what} was trained with another tokenizer (sha256 {theirs[:12]}...) than this run's data "
                f"(sha256 {ours[:12]}...): token ids would not mean the same thing"
            )

    def on_fit_start(self) -> None:
        if self.hparams.init_from and self.trainer.ckpt_path is None:
            if Path(self.hparams.init_from).is_dir():
                self._start_from_model_dir(self.hparams.init_from)
            else:
                self._start_from_previous_stage(self.hparams.init_from)

    def on_train_end(self) -> None:
        # The stage's last step need not be a logging step: write the per-source totals at its
        # last token so each stage's mixture reads off TensorBoard at the stage boundary.
        if self.hparams.source_names:
            self._flush_source_tokens()
            if self.logger is not None:
                self.logger.log_metrics({f"data/tokens/{n}": float(c) for n, c in
                                         zip(self.hparams.source_names, self.source_tokens_total)},
                                        step=self.tokens_seen)

    def _start_from_model_dir(self, path: str) -> None:
        """A model directory's weights (every parameter, shapes checked); optimizer and counters start afresh."""
        from danube.model.io import check_state_dict, read_weights

        state = read_weights(path)  # checksum-verified, finite
        check_state_dict(self.model, state, f"model_dir={path}")
        # Not strict: TE's `_extra_state` and a tied lm_head are not in the file (checked just above).
        self.model.load_state_dict(state, strict=False)
        log.info("started from the weights of model directory %s (fresh optimizer, 0 tokens)", path)

    def _start_from_previous_stage(self, path: str) -> None:
        """Weights, optimizer moments and tokens seen of the previous stage; loops start afresh."""
        from danube.checkpoints import load_checkpoint

        ckpt = load_checkpoint(path)
        self._check_tokenizer(ckpt, f"the previous stage's checkpoint {path}")
        load_full_state(self, self.trainer.optimizers[0], ckpt["state_dict"], ckpt["optimizer_states"][0])
        self._restore_counters(ckpt)
        log.info("started from %s at %s tokens", path, f"{self.tokens_seen:,}")


def recount_micro_batches(checkpoint: dict[str, Any], accumulate: int, world_size: int) -> None:
    """Fit a checkpoint's loop counters to this run's gradient accumulation (a resume on another world size).

    Lightning counts micro-batches, and decides where an optimizer step ends from that
    count; a checkpoint of step ``k`` made with accumulation ``a`` has counted ``k * a``.
    Resumed with accumulation ``b`` (the same global batch on another number of devices),
    the count becomes ``k * b``, so that the next step again takes ``b`` micro-batches.
    """
    step = int(checkpoint.get("global_step", 0))
    info = checkpoint.get("danube", {})
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not step or progress is None:
        return
    before = info.get("accumulate") or max(1, progress["total"]["ready"] // step)
    if before == accumulate:
        return
    shift = step * (accumulate - before)
    for part in ("total", "current"):
        for key in ("ready", "completed", "started", "processed"):
            progress[part][key] += shift
    log.info("resuming step %d on %d device(s) with %d micro-batches per step (the checkpoint: %s device(s), %d)",
             step, world_size, accumulate, info.get("world_size", "?"), before)
