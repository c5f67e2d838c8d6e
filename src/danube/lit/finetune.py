"""What SFT and DPO share as LightningModules: the optimizer, the LR schedule, what is logged, the loss scale.

:class:`danube.lit.sft.SFTModule` and :class:`danube.lit.dpo.DPOModule` subclass it. The
LR warms up and decays by optimizer step (:func:`danube.schedule.lr_at`, pretraining's schedule
counted in steps): a fine-tuning run is one fixed step plan, unlike pretraining's token-keyed stages.

TensorBoard's step is the console's: step k is written after the k-th optimizer step,
with the metrics of that whole step (all its micro-batches), at step 1, every
``log_every_n_steps`` and at the last step; held-out metrics after the steps they follow,
and at step 0 those of the model the run starts from. The module writes these itself:
Lightning's own logging writes at the 0-based step index and, under gradient
accumulation, once per micro-batch.
"""

from __future__ import annotations

import dataclasses

import torch

from danube.config import FinetuneOptimConfig
from danube.lit.clipping import ClipsGradients
from danube.optim import adamw
from danube.schedule import lr_at


class FinetuneModule(ClipsGradients):
    """What SFT and DPO share: AdamW over trainable parameters, cosine LR with warm-up by step.

    Args:
        model: the model to train (not saved into hparams).
        optim: AdamW and the step schedule (a ``FinetuneOptimConfig``, or its fields; recorded as fields).
        total_steps: optimizer steps of the run (the cosine ends there).
    """

    def __init__(self, model: torch.nn.Module, optim: FinetuneOptimConfig | dict, total_steps: int) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optim"])
        self.optim = optim if isinstance(optim, FinetuneOptimConfig) else FinetuneOptimConfig(**optim)
        self.hparams["optim"] = dataclasses.asdict(self.optim)  # plain values
        self.model = model

    def configure_optimizers(self):
        o = self.optim
        return adamw(self.model, lr=self.lr_now(), betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                     fused=o.fused)  # fused is safe: the module clips its own gradients (ClipsGradients)

    def lr_now(self) -> float:
        """The LR of the next optimizer step: step k (0-based) at progress k + 1 of ``total_steps``.

        Warm-up over ``round(warmup_ratio x total_steps)`` steps, then cosine to
        ``lr x min_lr_ratio``, which the last step uses (:func:`danube.schedule.lr_at`).
        """
        o, total = self.optim, int(self.hparams.total_steps)
        return lr_at(self.global_step + 1, lr=o.lr, min_lr=o.lr * o.min_lr_ratio, warmup=round(o.warmup_ratio * total),
                     total=total)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Once per optimizer step, after the last accumulated micro-batch: global_step counts
        # the steps taken before this one.
        lr = self.lr_now()
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.log_step({**self.step_values(), "train/lr": lr})

    # -- training metrics: one value per optimizer step, over all its micro-batches
    _step_terms: dict[str, list] | None = None

    def add_to_step(self, key: str, value: torch.Tensor | float, weight: torch.Tensor | float | None = None) -> None:
        """Add a micro-batch's part of a step metric: sum(value) / sum(weight) over the step (weight None: the sum).

        Tensors are summed as they are (no device sync per micro-batch) and read once per step.
        """
        if self._step_terms is None:
            self._step_terms = {}
        total = self._step_terms.setdefault(key, [0.0, None if weight is None else 0.0])
        total[0] = total[0] + (value.detach() if isinstance(value, torch.Tensor) else value)
        if weight is not None:
            total[1] = total[1] + (weight.detach() if isinstance(weight, torch.Tensor) else weight)

    def step_values(self) -> dict[str, float]:
        """This rank's metrics of the optimizer step just completed; starts the next step's sums."""
        terms, self._step_terms = self._step_terms or {}, None
        return {k: float(v) if w is None else float(v) / max(float(w), 1e-12) for k, (v, w) in terms.items()}

    def log_step(self, values: dict[str, float]) -> None:
        """Show the step's metrics (console, ``metrics.json``); write them to TensorBoard at the console's steps."""
        for key, value in values.items():
            self.log(key, value, on_step=True, on_epoch=False, logger=False, prog_bar=key == "train/loss")
        step, trainer = self.global_step + 1, self._trainer
        if trainer is None or self.logger is None:
            return
        if step == 1 or step % trainer.log_every_n_steps == 0 or step == trainer.max_steps:
            self.logger.log_metrics(values, step=step)

    # -- validation: sums over the whole held-out set, reduced over ranks, logged once per pass
    VAL_SUMS = 0  # how many sums a subclass's validation_step adds up
    last_val_step: int | None = None  # the optimizer step of the last validation pass
    start_metrics: dict[str, float] | None = None  # the held-out metrics of the model the run started from

    def on_validation_epoch_start(self) -> None:
        self.val_sums = torch.zeros(self.VAL_SUMS, dtype=torch.float64, device=self.device)

    @staticmethod
    def counted(batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """0 for a filler micro-batch (a rank short of validation data repeats one), else 1."""
        counted = batch.get("counted")
        return 1.0 if counted is None else counted.double()

    def reduced_val_sums(self) -> torch.Tensor:
        """The validation sums of every rank added up (each rank may hold a different share)."""
        self.last_val_step = self.global_step
        return self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")

    def log_validation(self, values: dict[str, torch.Tensor]) -> None:
        """Log one validation pass at the step it follows: the optimizer steps taken, as the console counts them.

        The pass before training (Lightning's sanity check, over the whole held-out set)
        is the starting model's: written at step 0 and kept in ``start_metrics``.
        """
        for key, value in values.items():  # already summed over ranks: the mean of equal values is the value
            self.log(key, value.float(), logger=False, sync_dist=True)
        plain = {k: float(v) for k, v in values.items()}
        if self.trainer.sanity_checking:
            self.start_metrics = plain
        if self.logger is not None:
            self.logger.log_metrics(plain, step=self.global_step)

    def loss_scale(self) -> float:
        """Undo Lightning's division by the accumulation count and DDP's mean over ranks."""
        if self._trainer is None:
            return 1.0
        return float(self.trainer.accumulate_grad_batches * self.trainer.world_size)
