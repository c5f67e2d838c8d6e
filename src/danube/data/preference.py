"""Preference pairs for DPO: (prompt messages, chosen reply, rejected reply), tokenized.

Shapes (``format`` of a ``chat_data`` source):

==================  ===========================================================================
``ultrafeedback``   UltraFeedback binarized: ``prompt``, ``chosen``/``rejected`` message lists
                    (the prompt turns, then the assistant reply)
``orca_dpo``        Orca DPO pairs: ``system``, ``question``, ``chosen``, ``rejected``
``distilabel_math`` distilabel math preference: ``instruction``, ``chosen_response``, ``rejected_response``
``pairs``           ``prompt`` (a string or a message list), ``chosen``, ``rejected`` (strings);
                    ``danube oasst2-pairs`` writes this shape
``oasst2``          Oasst2 message rows, paired by rank (:mod:`danube.data.oasst2`; ``lang``)
==================  ===========================================================================

Records come from a file, a local copy of a Hub dataset or a Hub id
(:mod:`danube.data.records`), one at a time. Pairs whose chosen and rejected replies are
the same text are dropped and counted.

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
from typing import Callable, Iterable, Iterator, Sequence

import torch

from danube.data.chat import TrainingTokenizer, check_messages, encode_conversation
from danube.data.records import ReadStats, RecordError, Rows, Schema, Source, as_source, text_field
from danube.losses import IGNORE

log = logging.getLogger(__name__)


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def _message_list(value, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError(f"{where}: {key!r} must be a message list, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"{where}: {key}[{i}] must be a {{role, content}} object, got {type(m).__name__}"
                              + (f" {m[:40]!r}" if isinstance(m, str) else ""))
    return value


def _reply_of(value, where: str, key: str) -> str:
    """A reply given as a string, or as a message list ending with the assistant's message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = _message_list(value, where, key)
        if msgs and msgs[-1]["role"] == "assistant":
            return text_field(msgs[-1], "content", f"{where}: {key}[-1]")
    raise RecordError(f"{where}: {key!r} must be a string or a message list ending with an assistant message")


def _ultrafeedback(r: dict, where: str) -> Pair:
    chosen = r["chosen"]
    if not isinstance(chosen, list) or len(chosen) < 2:
        raise RecordError(f"{where}: 'chosen' must be a message list (prompt turns, then the reply)")
    prompt = [{"role": m["role"], "content": m["content"]} for m in _message_list(chosen, where, "chosen")[:-1]]
    return Pair(prompt, _reply_of(chosen, where, "chosen"), _reply_of(r["rejected"], where, "rejected"))


def _orca_dpo(r: dict, where: str) -> Pair:
    system = r.get("system") or ""
    prompt = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": text_field(r, "question", where)}]
    return Pair(prompt, text_field(r, "chosen", where), text_field(r, "rejected", where))


def _distilabel_math(r: dict, where: str) -> Pair:
    return Pair([{"role": "user", "content": text_field(r, "instruction", where)}],
                text_field(r, "chosen_response", where), text_field(r, "rejected_response", where))


def _pairs(r: dict, where: str) -> Pair:
    prompt = r["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list):
        raise RecordError(f"{where}: 'prompt' must be a string or a message list")
    return Pair(prompt, _reply_of(r["chosen"], where, "chosen"), _reply_of(r["rejected"], where, "rejected"))


MESSAGE_LIST = "list of {content: string, role: user|assistant}"
PAIR_READERS: dict[str, tuple[Schema, Callable[[dict, str], Pair]]] = {
    "ultrafeedback": (Schema("UltraFeedback binarized", {"chosen": MESSAGE_LIST + ", the reply last",
                                                          "rejected": MESSAGE_LIST + ", the reply last"},
                             {"prompt": "string", "prompt_id": "string", "score_chosen": "float",
                              "score_rejected": "float"}), _ultrafeedback),
    "orca_dpo": (Schema("Orca DPO pairs", {"question": "string", "chosen": "string", "rejected": "string"},
                        {"system": "string (may be empty)"}), _orca_dpo),
    "distilabel_math": (Schema("distilabel math preference",
                               {"instruction": "string", "chosen_response": "string", "rejected_response": "string"},
                               {"chosen_rating": "float or null", "rejected_rating": "float or null"}),
                        _distilabel_math),
    "pairs": (Schema("preference pairs", {"prompt": "string or " + MESSAGE_LIST, "chosen": "string",
                                          "rejected": "string"}), _pairs),
}
FORMATS = (*PAIR_READERS, "oasst2")


def schema_of(format: str, label: str = "") -> Schema:
    """The columns a preference ``format`` reads; an unknown format names the allowed ones."""
    if format == "oasst2":
        from danube.data.oasst2 import SCHEMA

        return SCHEMA
    if format not in PAIR_READERS:
        raise ValueError(f"preference data format {format!r}{f' ({label})' if label else ''}; "
                         f"allowed: {', '.join(FORMATS)}")
    return PAIR_READERS[format][0]


def open_pairs(source: Source | str | Path, format: str) -> Rows:
    """The rows of a preference source, checked (file, split, columns) before anything is read."""
    source = as_source(source)
    return Rows(source, schema_of(format, source.label))


def iter_pairs(rows: Rows, format: str, lang: str | None = "en", stats: ReadStats | None = None) -> Iterator[Pair]:
    """Every preference pair of ``rows``, one at a time; a malformed record raises naming where it is.

    ``oasst2`` rows become pairs by rank (:func:`danube.data.oasst2.preference_pairs`, in
    language ``lang``). A pair whose chosen and rejected replies are the same text
    teaches nothing and is dropped (counted in ``stats``).
    """
    stats = stats if stats is not None else ReadStats()
    if format == "oasst2":
        from danube.data.oasst2 import preference_pairs, read_messages

        pairs, pstats = preference_pairs(read_messages(rows), lang=lang)
        stats.rows, stats.where = rows.count, rows.describe()
        stats.dropped.update({f"reply groups: {why}": n for why, n in pstats.skipped.items()})
        records = ((f"{rows.describe()}: reply group {p['parent_id']}", p) for p in pairs)
        schema, reader = PAIR_READERS["pairs"]
    else:
        schema, reader = PAIR_READERS[format]
        records = iter(rows)
    for where, record in records:
        schema.require(record, where)
        pair = reader(record, where)
        try:
            check_messages(pair.prompt, ends_with="user")
        except ValueError as err:
            raise RecordError(f"{where}: prompt: {err}") from err
        if pair.chosen == pair.rejected:
            stats.dropped["chosen and rejected identical"] += 1
            continue
        stats.kept += 1
        yield pair
    if format != "oasst2":
        stats.rows, stats.where = rows.count, rows.describe()


def read_pairs(source: Source | str | Path, format: str, lang: str | None = "en",
               stats: ReadStats | None = None) -> list[Pair]:
    """Every preference pair of one source (a file, a dataset directory or a Hub id), as a list."""
    return list(iter_pairs(open_pairs(source, format), format, lang, stats))


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


def tokenize_pairs(tok: TrainingTokenizer, pairs: Iterable[Pair], max_seq_len: int, min_completion_tokens: int = 8,
                   source: str = "") -> tuple[list[TokenizedPair], Counter]:
    out, counts, n = [], Counter(), 0
    for n, p in enumerate(pairs, 1):  # pairs may be a generator: a source is never held twice
        (chosen, c0), (rejected, r0) = _row(tok, p.prompt, p.chosen), _row(tok, p.prompt, p.rejected)
        if max_seq_len - max(c0, r0) < min_completion_tokens:
            counts["dropped (prompt too long)"] += 1
            continue
        if max(len(chosen), len(rejected)) > max_seq_len:
            counts["completions truncated"] += 1
            chosen, rejected = chosen[:max_seq_len], rejected[:max_seq_len]
        out.append(TokenizedPair(chosen, c0, rejected, r0))
    log.info("%s%d preference pairs -> %d (max_seq_len %d: %s)", f"{source}: " if source else "", n, len(out),
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
