"""The losses: pretraining's chunked cross-entropy, fine-tuning's masked cross-entropy and the DPO loss.

Labels and targets use :data:`IGNORE` (-100, PyTorch's ``ignore_index``) for positions that are not trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` with both gradients computed chunk by chunk.

    The gradients are taken in the forward pass, while each chunk's logits are at hand:
    softmax minus one-hot *is* the gradient of the logits, so nothing is stored or
    recomputed for the backward pass, which only scales the two saved gradients. Same
    three matmuls as the unfused loss, but only one chunk of logits (chunk x vocab, fp32)
    exists at a time, and the log-softmax and its backward are one in-place pass over it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, need_grad):  # noqa: D102
        # hidden (N, C), weight (V, C), targets (N,): already in the compute dtype.
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = (h @ weight.T).float()  # (n, V)
            keep = (t != IGNORE).unsqueeze(1)  # (n, 1)
            safe = t.clamp(min=0).unsqueeze(1)
            target_logit = logits.gather(1, safe)
            # logsumexp by hand so that its exp is the softmax's too: one pass fewer over
            # the chunk than torch.logsumexp followed by exp(logits - lse).
            peak = logits.amax(1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # in place: unnormalised softmax
            norm = probs.sum(1, keepdim=True)
            total += ((norm.log() + peak - target_logit) * keep).sum()
            if need_grad:
                probs.mul_(keep / norm)  # softmax; ignored positions contribute nothing
                probs.scatter_add_(1, safe, -keep.to(probs.dtype))  # minus one-hot
                g = probs.to(hidden.dtype)
                torch.mm(g, weight, out=grad_hidden[start : start + chunk_tokens])
                if g.dtype == torch.float32:
                    grad_weight.addmm_(g.T, h)  # accumulates in place: no (V, C) temporary
                else:
                    grad_weight += (g.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("linear_cross_entropy was called without gradients enabled; cannot backpropagate")
        return (grad_hidden * grad_total.to(grad_hidden.dtype), (grad_weight * grad_total).to(ctx.weight_dtype),
                None, None, None)


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Mean next-token loss of ``hidden @ weight.T`` without materialising all logits at once.

    ``hidden`` is ``(B, T, C)``, ``targets`` ``(B, T)`` with ``IGNORE`` for positions to skip.
    Logits and their softmax are computed in fp32 one chunk of ``chunk_tokens`` rows at a
    time (for a 32k vocabulary they are most of a step's activation memory); the gradients
    are formed in the same pass (:class:`_LinearCrossEntropy`). Under autocast the matmuls
    run in the autocast dtype, as ``F.linear`` would.
    """
    h, t = hidden.flatten(0, 1), targets.flatten()
    count = (t != IGNORE).sum().clamp(min=1)
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        total = _LinearCrossEntropy.apply(h.to(dtype), weight.to(dtype), t, max(1, int(chunk_tokens)), need_grad)
    return total / count


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
