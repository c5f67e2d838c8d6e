"""Supervised fine-tuning data: conversations in the common shapes, tokenized with loss masks.

Every reader turns one record into OpenAI-style ``messages`` ([{role, content}], roles
system | user | assistant). Shapes (``format`` of a ``chat_data`` source):

=============  ==============================================================
``messages``   ``{"messages": [{role, content}, ...]}`` (OpenAI)
``ultrachat``  same as ``messages`` (UltraChat 200k; its ``prompt`` repeats the first turn)
``sharegpt``   ``{"conversations": [{from: system|human|gpt, value}, ...]}``
``openorca``   ``{system_prompt, question, response}``
``metamath``   ``{query, response}`` (MetaMathQA)
``oasst2``     Oasst2 message rows: one conversation per tree along the best ranks
=============  ==============================================================

Records come from a file, a local copy of a Hub dataset or a Hub id
(:mod:`danube.data.records`), one at a time: :func:`iter_conversations` streams them
into tokenization, so only the tokenized samples are held.

Labels are the input ids on assistant tokens (each reply and its EOS) and -100 elsewhere;
the model predicts ``ids[t]`` from position ``t - 1`` (the shift happens in the loss).

Overlong samples (more than ``max_seq_len`` ids): ``truncation: truncate`` keeps the
first ``max_seq_len`` ids (later turns are lost), ``drop`` leaves the sample out; a sample
with no trained token left is always dropped. Both are counted in the log.

Packing concatenates samples into rows of ``max_seq_len``; ``segment_ids`` keep each
sample's attention to itself, ``position_ids`` restart at 0 for each sample, and the
first label of each sample is -100 so no sample is trained to predict another's start.
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

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TRUNCATION = ("truncate", "drop")


# -- readers: one record -> messages ---------------------------------------------------------
MESSAGE_LIST = "list of {content: string, role: system|user|assistant}"
SCHEMAS: dict[str, Schema] = {
    "messages": Schema("OpenAI messages", {"messages": MESSAGE_LIST}),
    "ultrachat": Schema("UltraChat 200k", {"messages": MESSAGE_LIST}, {"prompt": "string", "prompt_id": "string"}),
    "sharegpt": Schema("ShareGPT", {"conversations": "list of {from: system|human|gpt, value: string}"}),
    "openorca": Schema("OpenOrca", {"question": "string", "response": "string"},
                       {"system_prompt": "string (may be empty)", "id": "string"}),
    "metamath": Schema("MetaMathQA", {"query": "string", "response": "string"},
                       {"type": "string", "original_question": "string"}),
}


def _messages(record: dict, where: str, key: str = "messages") -> list[dict[str, str]]:
    msgs = record[key]
    if not isinstance(msgs, list):
        raise RecordError(f"{where}: {key!r} must be a list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"{where}: {key}[{i}] must be an object with 'role' and 'content', "
                              f"got {type(m).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _sharegpt(record: dict, where: str) -> list[dict[str, str]]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise RecordError(f"{where}: 'conversations' must be a list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or "value" not in t:
            raise RecordError(f"{where}: conversations[{i}] needs 'from' in {sorted(SHAREGPT_ROLES)} and 'value'")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return out


def _openorca(record: dict, where: str) -> list[dict[str, str]]:
    system = record.get("system_prompt") or ""
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    return msgs + [
        {"role": "user", "content": text_field(record, "question", where)},
        {"role": "assistant", "content": text_field(record, "response", where)},
    ]


def _metamath(record: dict, where: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": text_field(record, "query", where)},
        {"role": "assistant", "content": text_field(record, "response", where)},
    ]


RECORD_READERS: dict[str, Callable[[dict, str], list[dict[str, str]]]] = {
    "messages": _messages,
    "ultrachat": _messages,
    "sharegpt": _sharegpt,
    "openorca": _openorca,
    "metamath": _metamath,
}
FORMATS = (*RECORD_READERS, "oasst2")


def schema_of(format: str, label: str = "") -> Schema:
    """The columns an SFT ``format`` reads; an unknown format names the allowed ones."""
    if format == "oasst2":
        from danube.data.oasst2 import SCHEMA

        return SCHEMA
    if format not in SCHEMAS:
        raise ValueError(f"chat data format {format!r}{f' ({label})' if label else ''}; allowed: {', '.join(FORMATS)}")
    return SCHEMAS[format]


def open_conversations(source: Source | str | Path, format: str) -> Rows:
    """The rows of an SFT source, checked (file, split, columns) before anything is read."""
    source = as_source(source)
    return Rows(source, schema_of(format, source.label))


def iter_conversations(rows: Rows, format: str, lang: str | None = None,
                       stats: ReadStats | None = None) -> Iterator[list[dict[str, str]]]:
    """Every conversation of ``rows``, one at a time; a malformed record raises naming where it is.

    ``stats`` (filled as the rows go by) counts the rows read, the conversations kept and
    the ones dropped, by reason.
    """
    stats = stats if stats is not None else ReadStats()
    if format == "oasst2":
        from danube.data.oasst2 import best_path_conversations, read_messages

        convs, skipped = best_path_conversations(read_messages(rows), lang=lang)
        stats.rows, stats.kept, stats.where = rows.count, len(convs), rows.describe()
        stats.dropped.update({f"trees: {why}": n for why, n in skipped.items()})
        yield from convs
        return
    reader, schema = RECORD_READERS[format], schema_of(format)
    for where, record in rows:
        schema.require(record, where)
        msgs = reader(record, where)
        try:
            check_messages(msgs, ends_with="assistant")
        except ValueError as err:
            raise RecordError(f"{where}: {err}") from err
        stats.kept += 1
        yield msgs
    stats.rows, stats.where = rows.count, rows.describe()


def read_conversations(source: Source | str | Path, format: str, lang: str | None = None,
                       stats: ReadStats | None = None) -> list[list[dict[str, str]]]:
    """Every conversation of one source (a file, a dataset directory or a Hub id), as a list."""
    return list(iter_conversations(open_conversations(source, format), format, lang, stats))


# -- tokenization -----------------------------------------------------------------------------
@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)  # labels[0] is never predicted


def tokenize_conversation(tok: TrainingTokenizer, messages: Sequence[dict[str, str]]) -> Sample:
    ids, trained = encode_conversation(tok, messages)
    return Sample(ids, [i if t else IGNORE for i, t in zip(ids, trained)])


def tokenize_conversations(
    tok: TrainingTokenizer, conversations: Iterable[Sequence[dict[str, str]]], max_seq_len: int, truncation: str = "truncate",
    source: str = "",
) -> tuple[list[Sample], Counter]:
    """Tokenize, then apply the truncation policy; returns the samples and what happened to the rest."""
    if truncation not in TRUNCATION:
        raise ValueError(f"train.truncation={truncation!r}; allowed: {', '.join(TRUNCATION)}")
    samples, counts = [], Counter()
    for msgs in conversations:
        s = tokenize_conversation(tok, msgs)
        counts["samples"] += 1
        if len(s.input_ids) > max_seq_len:
            if truncation == "drop":
                counts["dropped (too long)"] += 1
                continue
            s = Sample(s.input_ids[:max_seq_len], s.labels[:max_seq_len])
            counts["truncated"] += 1
        if s.loss_tokens == 0:
            counts["dropped (no answer token left)"] += 1
            continue
        samples.append(s)
    log.info("%s%d conversations -> %d samples (max_seq_len %d, truncation=%s: %s)", f"{source}: " if source else "",
             counts["samples"], len(samples), max_seq_len, truncation,
             ", ".join(f"{n} {k}" for k, n in counts.items() if k != "samples") or "none affected")
    return samples, counts


# -- packing ----------------------------------------------------------------------------------
@dataclass
class Packed:
    """Several samples in one row: ``segment_ids`` number them, ``position_ids`` restart at 0."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    segment_ids: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def pack_samples(samples: Sequence[Sample], seq_len: int) -> list[Packed]:
    """Greedy packing in order: a row is closed when the next sample does not fit."""
    rows: list[Packed] = []
    cur = Packed([], [], [], [])
    for s in samples:
        if len(s.input_ids) > seq_len:
            raise ValueError(f"a sample of {len(s.input_ids)} tokens does not fit in a packed row of {seq_len}")
        if cur.input_ids and len(cur.input_ids) + len(s.input_ids) > seq_len:
            rows.append(cur)
            cur = Packed([], [], [], [])
        seg = cur.segment_ids[-1] + 1 if cur.segment_ids else 0
        cur.input_ids += s.input_ids
        cur.labels += [IGNORE] + s.labels[1:]  # never predict a sample's first token from the previous one
        cur.position_ids += list(range(len(s.input_ids)))
        cur.segment_ids += [seg] * len(s.input_ids)
    if cur.input_ids:
        rows.append(cur)
    return rows


def collate(items: Sequence[Sample | Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (labels -100 there).

    Unpacked rows need no mask beyond the causal one: right padding is never attended
    by real tokens. Packed rows carry ``position_ids`` and ``segment_ids`` (padding has
    segment -1, a segment of its own).
    """
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for r, x in enumerate(items):
        ids[r, : len(x.input_ids)] = torch.tensor(x.input_ids)
        labels[r, : len(x.labels)] = torch.tensor(x.labels)
    batch = {"input_ids": ids, "labels": labels}
    if any(isinstance(x, Packed) for x in items):
        pos = torch.arange(width).repeat(len(items), 1)
        seg = torch.full((len(items), width), -1, dtype=torch.long)
        for r, x in enumerate(items):
            n = len(x.input_ids)
            pos[r, :n] = torch.tensor(x.position_ids)
            seg[r, :n] = torch.tensor(x.segment_ids)
        batch.update(position_ids=pos, segment_ids=seg)
    return batch
