"""Preference pairs for DPO: (prompt messages, chosen reply, rejected reply), tokenized.

Shapes (``format`` of a ``chat_data`` source):

==================  ===========================================================================
``ultrafeedback``   UltraFeedback binarized: ``prompt``, ``chosen``/``rejected`` message lists
                    (the prompt turns, then the assistant reply)
``orca_dpo``        Orca DPO pairs: ``system``, ``question``, ``chosen``, ``rejected``
``distilabel_math`` distilabel math preference: ``instruction``, ``chosen_response``, ``rejected_response``
``pairs``           ``prompt`` (a string or a message list), ``chosen``, ``rejected`` (strings);
                    ``danube oasst2-pairs`` writes this shape
==================  ===========================================================================

Chosen and rejected share the prompt ids (:func:`danube.data.chat.encode_chat_prompt`);
each completion is the reply's ids and EOS. Labels are -100 on the prompt, so log-probs
are summed over completion tokens only. A pair longer than ``max_seq_len``: the
completions are cut to fit (counted); a prompt leaving fewer than ``min_completion_tokens``
is dropped (counted).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from danube.data.chat import ChatTokenizer, check_messages, encode_chat_prompt
from danube.data.records import RecordError, read_jsonl, require, text_field
from danube.data.sft import IGNORE

log = logging.getLogger(__name__)


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def _reply_of(value, where: str, key: str) -> str:
    """A reply given as a string, or as a message list ending with the assistant's message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return text_field(value[-1], "content", f"{where}: {key}[-1]")
    raise RecordError(f"{where}: {key!r} must be a string or a message list ending with an assistant message")


def _ultrafeedback(r: dict, where: str) -> Pair:
    require(r, ("chosen", "rejected"), where, "UltraFeedback")
    chosen = r["chosen"]
    if not isinstance(chosen, list) or len(chosen) < 2:
        raise RecordError(f"{where}: 'chosen' must be a message list (prompt turns, then the reply)")
    prompt = [{"role": m.get("role"), "content": m.get("content")} for m in chosen[:-1]]
    return Pair(prompt, _reply_of(chosen, where, "chosen"), _reply_of(r["rejected"], where, "rejected"))


def _orca_dpo(r: dict, where: str) -> Pair:
    require(r, ("question", "chosen", "rejected"), where, "Orca DPO")
    system = r.get("system") or ""
    prompt = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": text_field(r, "question", where)}]
    return Pair(prompt, text_field(r, "chosen", where), text_field(r, "rejected", where))


def _distilabel_math(r: dict, where: str) -> Pair:
    require(r, ("instruction", "chosen_response", "rejected_response"), where, "distilabel math")
    return Pair([{"role": "user", "content": text_field(r, "instruction", where)}],
                text_field(r, "chosen_response", where), text_field(r, "rejected_response", where))


def _pairs(r: dict, where: str) -> Pair:
    require(r, ("prompt", "chosen", "rejected"), where, "preference pair")
    prompt = r["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list):
        raise RecordError(f"{where}: 'prompt' must be a string or a message list")
    return Pair(prompt, _reply_of(r["chosen"], where, "chosen"), _reply_of(r["rejected"], where, "rejected"))


PAIR_READERS: dict[str, Callable[[dict, str], Pair]] = {
    "ultrafeedback": _ultrafeedback,
    "orca_dpo": _orca_dpo,
    "distilabel_math": _distilabel_math,
    "pairs": _pairs,
}


def read_pairs(path: str | Path, format: str) -> list[Pair]:
    if format not in PAIR_READERS:
        raise ValueError(f"preference data format {format!r} ({path}); allowed: {', '.join(PAIR_READERS)}")
    pairs = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        pair = PAIR_READERS[format](record, where)
        try:
            check_messages(pair.prompt, ends_with="user")
        except ValueError as err:
            raise RecordError(f"{where}: prompt: {err}") from err
        pairs.append(pair)
    return pairs


@dataclass
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]  # completion ids, EOS last
    rejected: list[int]

    @property
    def loss_tokens(self) -> int:
        return 1  # DPO averages over pairs, not tokens


def tokenize_pairs(tok: ChatTokenizer, pairs: Sequence[Pair], max_seq_len: int, min_completion_tokens: int = 8,
                   source: str = "") -> tuple[list[TokenizedPair], Counter]:
    out, counts = [], Counter()
    for p in pairs:
        prompt = encode_chat_prompt(tok, p.prompt)
        chosen = tok.encode(p.chosen) + [tok.eos_id]
        rejected = tok.encode(p.rejected) + [tok.eos_id]
        room = max_seq_len - len(prompt)
        if room < min_completion_tokens:
            counts["dropped (prompt too long)"] += 1
            continue
        if max(len(chosen), len(rejected)) > room:
            counts["completions truncated"] += 1
            chosen, rejected = chosen[:room], rejected[:room]
        out.append(TokenizedPair(prompt, chosen, rejected))
    log.info("%s%d preference pairs -> %d (max_seq_len %d: %s)", f"{source}: " if source else "", len(pairs), len(out),
             max_seq_len, ", ".join(f"{n} {k}" for k, n in counts.items()) or "none affected")
    return out, counts


def collate_pairs(items: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, right-padded to one width: one forward for both."""
    rows = [(p.prompt, p.chosen) for p in items] + [(p.prompt, p.rejected) for p in items]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (prompt, completion) in enumerate(rows):
        seq = prompt + completion
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(prompt): len(seq)] = torch.tensor(completion)
    return {"input_ids": ids, "labels": labels}
