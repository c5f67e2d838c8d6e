"""KV-cached decoding: greedy or sampled, batched prompts of different lengths.

Prompts are left-padded; pads get segment 0 and position 0, real tokens segment 1 and
positions ``0..n-1``, so every row decodes exactly as it would alone. The cache keeps
all keys and the sliding window is applied by the attention mask, so a prompt longer
than the window stays correct.

The sampling knobs mean what they mean in ``transformers`` ``generate``: the repetition
penalty divides positive (multiplies negative) logits of every token already in the
row (prompt included); then temperature, top-k and top-p filter, in that order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from danube.model.transformer import Danube

log = logging.getLogger(__name__)

Tensor = torch.Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    repetition_penalty: float = 1.0  # 1.0: none; the report's MT-Bench runs use 1.1
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """``transformers`` semantics: logits of tokens in ``seen`` (B, V bool) shrink towards less likely."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k / nucleus to -inf (at least one token always survives)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: Tensor, seen: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """One token per row from last-position logits ``(B, V)``."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, positions, segments)``, each ``(B, T_max)``: pads segment 0 / position 0."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    seg = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        n = len(p)
        ids[i, t - n :] = torch.as_tensor(list(p), dtype=torch.long)
        pos[i, t - n :] = torch.arange(n)
        seg[i, t - n :] = 1
    return ids.to(device), pos.to(device), seg.to(device)


@torch.no_grad()
def generate(
    model: Danube,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams = SamplingParams(),
    decode: Callable[[list[int]], str] | None = None,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt; returns the new token ids per prompt (stop token not included).

    A row stops at any of ``params.stop_token_ids``, when its decoded continuation
    contains one of ``params.stop_strings`` (needs ``decode``), or after
    ``max_new_tokens``. A row stopped by a string keeps the tokens that spell it: cutting
    the text is the caller's (``DanubeLM.generate_until`` leaves it to lm-eval's own
    post-processing, as lm-eval's ``hf`` model does). Finished rows are dropped from the
    batch (and the cache) so the rest decode faster.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with BOS)")
    if params.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function to read the generated text")
    device = next(model.parameters()).device
    vocab = model.cfg.vocab_size
    longest = max(len(p) for p in prompts)
    if longest + params.max_new_tokens > model.cfg.max_seq_len:
        log.warning(
            "prompt (%d tokens) + max_new_tokens (%d) exceeds the model's max_seq_len %d",
            longest, params.max_new_tokens, model.cfg.max_seq_len,
        )
    outputs: list[list[int]] = [[] for _ in prompts]
    if params.max_new_tokens == 0:
        return outputs
    ids, pos, seg = left_pad(prompts, pad_id, device)
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
    seen.scatter_(1, ids, seg.bool())  # pads do not count as seen tokens
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
    rows = torch.arange(len(prompts), device=device)  # original index of each live row

    was_training = model.training
    model.eval()
    cache = model.new_cache()
    logits = model(ids, position_ids=pos, segment_ids=seg, cache=cache)[:, -1]
    for step in range(params.max_new_tokens):
        tok = next_token(logits, seen, params, generator)  # (B_live,)
        done = torch.isin(tok, stop_ids) if len(stop_ids) else torch.zeros_like(tok, dtype=torch.bool)
        for j, (r, t) in enumerate(zip(rows.tolist(), tok.tolist())):
            if done[j]:
                continue
            outputs[r].append(t)
            if params.stop_strings:
                text = decode(outputs[r])
                if any(s in text for s in params.stop_strings):
                    done[j] = True
        if step == params.max_new_tokens - 1:
            break
        keep = (~done).nonzero().squeeze(-1)
        if len(keep) == 0:
            break
        if len(keep) < len(rows):
            cache.reorder(keep)
            rows, tok, seen, lengths = rows[keep], tok[keep], seen[keep], lengths[keep]
        seen[torch.arange(len(rows), device=device), tok] = True
        step_pos = (lengths + step)[:, None]  # (B_live, 1)
        logits = model(tok[:, None], position_ids=step_pos, segment_ids=torch.ones_like(step_pos), cache=cache)[:, -1]
    model.train(was_training)
    return outputs

