"""Supervised fine-tuning as a LightningModule: every parameter, loss on assistant tokens only.

Validation (a held-out set, see ``train.val_fraction``): ``val/loss`` is the summed token
loss of the whole set divided by its answer-token count, over all ranks together.

Loss normalisation: each micro-batch carries ``step_loss_tokens``, the trained tokens of
its whole optimizer step on all ranks (see :class:`danube.data.finetune.StepBatches`). A
micro-batch contributes ``sum of its token losses / step_loss_tokens``, so the
accumulated gradient is that of one big batch's per-token mean, however the tokens fall
into micro-batches. Lightning divides each micro-batch's loss by the accumulation count
and DDP averages over ranks, so the returned loss is multiplied back by both.
"""

from __future__ import annotations

import torch

from danube.lit.finetune import FinetuneModule
from danube.losses import token_loss_sum


class SFTModule(FinetuneModule):
    """Next-token loss on assistant tokens, summed and divided by the optimizer step's token count."""

    def micro_batch_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(this micro-batch's share of the step loss, its summed token loss, its loss-token count)."""
        logits = self.model(batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids"))
        loss_sum, count = token_loss_sum(logits, batch["labels"])
        step_tokens = batch["step_loss_tokens"].to(loss_sum.device).clamp(min=1)
        return loss_sum / step_tokens, loss_sum.detach(), count

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        share, loss_sum, count = self.micro_batch_loss(batch)
        self.add_to_step("train/loss", loss_sum, count)  # the step's token mean (this rank's)
        self.add_to_step("train/answer_tokens", count)
        return share * self.loss_scale()

    VAL_SUMS = 2  # summed token loss, answer tokens

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids"))
        loss_sum, count = token_loss_sum(logits, batch["labels"])
        self.val_sums += torch.stack([loss_sum.double(), count.double()]) * self.counted(batch)

    def on_validation_epoch_end(self) -> None:
        loss_sum, tokens = self.reduced_val_sums()
        self.log_validation({"val/loss": loss_sum / tokens.clamp(min=1), "val/answer_tokens": tokens})
