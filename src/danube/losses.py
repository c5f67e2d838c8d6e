"""Fine-tuning losses: masked next-token cross-entropy and the DPO loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of predicting ``labels[:, 1:]`` from ``logits[:, :-1]``, and the count.

    Positions labelled -100 contribute nothing. Dividing by a count taken over a whole
    optimizer step (not this micro-batch) gives every trained token the same weight.
    """
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, (targets != IGNORE).sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the labelled tokens (completion tokens only)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * mask).sum(-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sigmoid DPO loss (Rafailov et al., 2023), per example.

    ``loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``; the rewards are
    ``beta * (pi - ref)`` of each reply, detached (they are for logging).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``(batch,)``.
    """
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_ratio = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
