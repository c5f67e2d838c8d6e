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

Each row is the whole conversation, prompt turns then the reply, with the ids the exported
tokenizer gives it (:func:`danube.data.chat.encode_conversation`); the completion is the
tokens of the reply and its EOS, found from the pieces' offsets. Labels are -100 on the
prompt, so log-probs are summed over completion tokens only. A pair longer than
``max_seq_len``: the completions are cut to fit (counted); a prompt leaving fewer than
``min_completion_tokens`` is dropped (counted).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from danube.data.chat import TrainingTokenizer, check_messages, encode_conversation
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
    """Both rows of a pair, each a whole conversation; ``*_start`` is where its completion begins."""

    chosen: list[int]  # prompt ids, then the completion (EOS last)
    chosen_start: int
    rejected: list[int]
    rejected_start: int

    @property
    def loss_tokens(self) -> int:
        return 1  # DPO averages over pairs, not tokens


def _row(tok: TrainingTokenizer, prompt: list[dict[str, str]], reply: str) -> tuple[list[int], int]:
    ids, trained = encode_conversation(tok, [*prompt, {"role": "assistant", "content": reply}], last_reply_only=True)
    return ids, trained.index(True)  # the completion is a suffix: the reply's tokens and its EOS


def tokenize_pairs(tok: TrainingTokenizer, pairs: Sequence[Pair], max_seq_len: int, min_completion_tokens: int = 8,
                   source: str = "") -> tuple[list[TokenizedPair], Counter]:
    out, counts = [], Counter()
    for p in pairs:
        (chosen, c0), (rejected, r0) = _row(tok, p.prompt, p.chosen), _row(tok, p.prompt, p.rejected)
        if max_seq_len - max(c0, r0) < min_completion_tokens:
            counts["dropped (prompt too long)"] += 1
            continue
        if max(len(chosen), len(rejected)) > max_seq_len:
            counts["completions truncated"] += 1
            chosen, rejected = chosen[:max_seq_len], rejected[:max_seq_len]
        out.append(TokenizedPair(chosen, c0, rejected, r0))
    log.info("%s%d preference pairs -> %d (max_seq_len %d: %s)", f"{source}: " if source else "", len(pairs), len(out),
             max_seq_len, ", ".join(f"{n} {k}" for k, n in counts.items()) or "none affected")
    return out, counts


def collate_pairs(items: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, right-padded to one width: one forward for both."""
    rows = [(p.chosen, p.chosen_start) for p in items] + [(p.rejected, p.rejected_start) for p in items]
    width = max(len(seq) for seq, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (seq, start) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, start: len(seq)] = torch.tensor(seq[start:])
    return {"input_ids": ids, "labels": labels}
