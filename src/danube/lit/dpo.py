"""Direct preference optimisation with LoRA: the reference is the same model, adapters off.

A batch holds the chosen rows, then the rejected rows (one forward for both). Log-probs
are summed over completion tokens only. The reference pass runs under ``no_grad`` with
``model.disable_adapter()``, i.e. the weights the adapters were added to. Since peft
starts ``lora_B`` at zero, step 0 has policy == reference: loss ln 2, rewards 0.

Validation logs ``val/loss`` and ``val/rewards/*``, ``val/logps/*``: means over every
held-out pair, all ranks together.
"""

from __future__ import annotations

import torch

from danube.config import FinetuneOptimConfig
from danube.lit.finetune import FinetuneModule
from danube.losses import dpo_loss, sequence_logps


class DPOModule(FinetuneModule):
    """Args: model (a peft-wrapped Danube), optim, total_steps, beta."""

    def __init__(self, model: torch.nn.Module, optim: FinetuneOptimConfig | dict, total_steps: int, beta: float) -> None:
        super().__init__(model, optim, total_steps)
        self.save_hyperparameters("beta")  # beside what FinetuneModule recorded
        if not hasattr(model, "disable_adapter"):
            raise TypeError("DPOModule needs a peft-wrapped model (danube.lora.add_lora): the reference is the "
                            "same model with its adapters disabled")

    def pair_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per pair: the DPO loss, the implicit rewards and their comparison, the policy log-probs."""
        ids, labels = batch["input_ids"], batch["labels"]
        n = ids.shape[0] // 2
        with torch.no_grad(), self.model.disable_adapter():
            ref = sequence_logps(self.model(ids), labels)
        logps = sequence_logps(self.model(ids), labels)
        losses, chosen_r, rejected_r = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], float(self.hparams.beta))
        return {
            "loss": losses,
            "rewards/chosen": chosen_r,
            "rewards/rejected": rejected_r,
            "rewards/accuracies": (chosen_r > rejected_r).float(),  # strict wins; ties count 0
            "rewards/margins": chosen_r - rejected_r,
            "logps/chosen": logps[:n].detach(),
            "logps/rejected": logps[n:].detach(),
        }

    def pair_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean DPO loss, the logged metrics) of one batch of pairs."""
        terms = self.pair_terms(batch)
        losses = terms.pop("loss")
        return losses.mean(), {k: v.detach().mean() for k, v in terms.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.pair_losses(batch)
        # Every micro-batch holds the same number of pairs: the mean over the step's
        # micro-batches is the mean over its pairs (as is Lightning's accumulated gradient).
        for key, value in {"train/loss": loss.detach(), **metrics}.items():
            self.add_to_step(key, value, 1)
        return loss

    VAL_TERMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected")
    VAL_SUMS = len(VAL_TERMS) + 1  # each term summed over pairs, then the pair count

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        terms = self.pair_terms(batch)
        n = terms["loss"].new_tensor(terms["loss"].numel())
        sums = torch.stack([terms[k].detach().sum() for k in self.VAL_TERMS] + [n]).double()
        self.val_sums += sums * self.counted(batch)

    def on_validation_epoch_end(self) -> None:
        sums = self.reduced_val_sums()
        pairs = sums[-1]
        means = {f"val/{key}": total / pairs.clamp(min=1) for key, total in zip(self.VAL_TERMS, sums[:-1])}
        self.log_validation({**means, "val/pairs": pairs})
