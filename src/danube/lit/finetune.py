"""What SFT and DPO share as LightningModules: the optimizer, the LR schedule, validation sums, the loss scale.

:class:`danube.lit.sft.SFTModule` and :class:`danube.lit.dpo.DPOModule` subclass it. The
LR warms up and decays by optimizer step (:func:`danube.schedule.lr_at`, pretraining's schedule
counted in steps): a fine-tuning run is one fixed step plan, unlike pretraining's token-keyed stages.
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
        self.log("train/lr", lr, on_step=True, on_epoch=False)

    # -- validation: sums over the whole held-out set, reduced over ranks, logged once per pass
    VAL_SUMS = 0  # how many sums a subclass's validation_step adds up
    last_val_step: int | None = None  # the optimizer step of the last validation pass

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
        """Log one validation pass at the step axis of the training step it follows.

        Lightning logs ``train/*`` at the 0-based index of the optimizer step, and a
        validation inside ``fit`` there too, but ``trainer.validate`` after the last step
        one further: written here, every pass lands beside the training step it follows.
        """
        for key, value in values.items():  # already summed over ranks: the mean of equal values is the value
            self.log(key, value.float(), logger=False, sync_dist=True)
        if self.logger is not None and not self.trainer.sanity_checking:
            self.logger.log_metrics({k: float(v) for k, v in values.items()}, step=max(self.global_step - 1, 0))

    def loss_scale(self) -> float:
        """Undo Lightning's division by the accumulation count and DDP's mean over ranks."""
        if self._trainer is None:
            return 1.0
        return float(self.trainer.accumulate_grad_batches * self.trainer.world_size)
