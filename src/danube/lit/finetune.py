"""What SFT and DPO share as LightningModules: the optimizer, the LR schedule, validation sums, the loss scale.

:class:`danube.lit.sft.SFTModule` and :class:`danube.lit.dpo.DPOModule` subclass it. The
LR warms up and decays by optimizer step (:func:`danube.schedule.cosine_with_warmup`):
a fine-tuning run is one fixed step plan, unlike pretraining's token-keyed stages.
"""

from __future__ import annotations

import lightning as L
import torch

from danube.schedule import cosine_with_warmup


class FinetuneModule(L.LightningModule):
    """What SFT and DPO share: AdamW over trainable parameters, cosine LR with warm-up by step.

    Args:
        model: the model to train (not saved into hparams).
        optim: lr, min_lr_ratio, warmup_ratio, betas, eps, weight_decay.
        total_steps: optimizer steps of the run (the cosine ends there).
    """

    def __init__(self, model: torch.nn.Module, optim: dict, total_steps: int) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def configure_optimizers(self):
        o = self.hparams.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": float(o.get("weight_decay", 0.0))}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=float(o["lr"]), betas=tuple(o.get("betas", (0.9, 0.999))),
                                eps=float(o.get("eps", 1e-8)))
        total = int(self.hparams.total_steps)
        warmup = int(round(float(o.get("warmup_ratio", 0.0)) * total))
        min_ratio = float(o.get("min_lr_ratio", 0.0))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warmup, min_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

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
