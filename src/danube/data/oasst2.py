"""OpenAssistant (Oasst2) message trees: conversations for SFT, ranked preference pairs for DPO.

Oasst2 is published as one row per message (``message_id``, ``parent_id``, ``role`` =
prompter | assistant, ``rank`` among its siblings, 0 = best, or null, ``lang``,
``deleted``, ``text``, ``message_tree_id``, ...) in ``data/{train,validation}-*.parquet``.
Read it from the Hub (``hub: OpenAssistant/oasst2``), from a local copy of that repository,
or from a ``.jsonl``/``.parquet`` file of such rows (:mod:`danube.data.records`).

Pairs (report, section 6.2): for every group of sibling assistant replies with at least
two ranked, non-deleted replies in the chosen language, chosen = the best rank (0),
rejected = the worst (highest) rank, prompt = the conversation from the root to their
parent. One pair per group.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from danube.data.chat import check_messages
from danube.data.records import RecordError, Rows, Schema, Source, as_source, file_of, write_jsonl

log = logging.getLogger(__name__)

ROLES = {"prompter": "user", "assistant": "assistant"}
SCHEMA = Schema(
    "Oasst2 (one row per message)",
    {"message_id": "string", "parent_id": "string or null (a tree's root)", "role": "prompter | assistant",
     "text": "string"},
    {"rank": "integer or null", "lang": "string", "deleted": "bool", "message_tree_id": "string"},
)


@dataclass(eq=False)
class Message:
    id: str
    parent_id: str | None
    role: str  # prompter | assistant
    text: str
    rank: int | None
    lang: str | None
    deleted: bool
    where: str = ""  # FILE:LINE or FILE: row N, for errors
    tree_id: str | None = None
    children: list["Message"] = field(default_factory=list)


def read_messages(rows: Rows | Iterable[tuple[str, dict]] | str | Path) -> dict[str, Message]:
    """Every message row, linked to its children; malformed rows name where they are.

    ``rows`` is a :class:`~danube.data.records.Rows` (or ``(where, row)`` pairs), or a path
    to a file or dataset directory. A loop of parent links is refused here, naming its
    messages: no tree could be walked otherwise.
    """
    if isinstance(rows, (str, Path)):
        rows = Rows(as_source(rows), SCHEMA)
    messages: dict[str, Message] = {}
    for where, row in rows:
        SCHEMA.require(row, where)
        if row["role"] not in ROLES:
            raise RecordError(f"{where}: role {row['role']!r}; Oasst2 roles are {sorted(ROLES)}")
        rank = row.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank != int(rank)):
            raise RecordError(f"{where}: rank must be an integer or null, got {rank!r}")
        if not isinstance(row["text"], str):
            raise RecordError(f"{where}: field 'text' must be a string")
        mid = str(row["message_id"])
        if mid in messages:
            raise RecordError(f"{where}: message_id {mid} appears twice (first at {messages[mid].where})")
        tree = row.get("message_tree_id")
        messages[mid] = Message(
            id=mid, parent_id=None if row["parent_id"] is None else str(row["parent_id"]), role=row["role"],
            text=row["text"], rank=None if rank is None else int(rank), lang=row.get("lang"),
            deleted=bool(row.get("deleted") or False), where=where, tree_id=None if tree is None else str(tree),
        )
    for m in messages.values():
        if m.parent_id is not None and m.parent_id in messages:
            messages[m.parent_id].children.append(m)
    check_no_cycles(messages)
    return messages


def check_no_cycles(messages: dict[str, Message]) -> None:
    """Raise a :class:`RecordError` naming the messages of a parent-link loop, if there is one."""
    done: set[str] = set()
    for m in messages.values():
        chain: dict[str, Message] = {}  # this walk up the parents, in order
        node: Message | None = m
        while node is not None and node.id not in done:
            if node.id in chain:
                loop = list(chain)[list(chain).index(node.id):] + [node.id]
                files = sorted({file_of(chain[i].where) for i in loop[:-1]})
                raise RecordError(f"{', '.join(files)}: Oasst2 parent links form a loop: {' -> '.join(loop)} "
                                  f"(first row: {chain[loop[0]].where})")
            chain[node.id] = node
            node = messages.get(node.parent_id) if node.parent_id is not None else None
        done.update(chain)


def roots(messages: dict[str, Message]) -> list[Message]:
    return [m for m in messages.values() if m.parent_id is None]


def path_to(messages: dict[str, Message], message: Message) -> list[Message] | None:
    """Root..message, or None when an ancestor is missing or deleted."""
    path, seen = [message], {message.id}
    while path[-1].parent_id is not None:
        parent = messages.get(path[-1].parent_id)
        if parent is None or parent.deleted:
            return None
        if parent.id in seen:  # read_messages refuses loops; this keeps hand-built trees finite
            raise RecordError(f"{parent.where}: Oasst2 parent links form a loop through message {parent.id}")
        seen.add(parent.id)
        path.append(parent)
    return path[::-1]


def as_chat(path: list[Message]) -> list[dict[str, str]]:
    return [{"role": ROLES[m.role], "content": m.text} for m in path]


def _rank_key(m: Message) -> tuple[int, int]:
    return (m.rank is None, m.rank or 0)


def best_path_conversations(messages: dict[str, Message], lang: str | None = None) -> tuple[list[list[dict]], Counter]:
    """One SFT conversation per tree: from the root, always the best-ranked non-deleted reply.

    Unranked replies count after ranked ones; the conversation ends at the last assistant
    message of that path. Trees whose root is deleted, in another language, or that have
    no usable assistant reply are counted and skipped.
    """
    conversations, skipped = [], Counter()
    for root in roots(messages):
        if root.deleted:
            skipped["deleted root"] += 1
            continue
        if lang is not None and root.lang != lang:
            skipped["other language"] += 1
            continue
        path, node = [root], root
        while True:
            options = [c for c in node.children if not c.deleted and (lang is None or c.lang == lang)]
            if not options:
                break
            node = min(options, key=_rank_key)
            path.append(node)
        while path and path[-1].role != "assistant":
            path.pop()
        if len(path) < 2:
            skipped["no assistant reply"] += 1
            continue
        chat = as_chat(path)
        try:
            check_messages(chat, ends_with="assistant")
        except ValueError as err:
            raise RecordError(f"{root.where}: Oasst2 tree {root.tree_id or root.id}: {err} "
                              f"(along messages {' -> '.join(m.id for m in path)})") from None
        conversations.append(chat)
    return conversations, skipped


@dataclass
class PairStats:
    trees: int = 0
    groups: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # groups, by reason
    dropped_replies: Counter = field(default_factory=Counter)  # replies left out of their group, by reason

    def summary(self, lang: str | None) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped_replies.items())) or "none"
        return (
            f"trees: {self.trees} seen\n"
            f"reply groups (sibling assistant replies): {self.groups} seen, {self.kept} kept, "
            f"{sum(self.skipped.values())} skipped ({skipped})\n"
            f"replies left out of their group: {dropped}\n"
            f"pairs written: {self.kept}" + (f" (language {lang})" if lang else " (all languages)")
        )


def preference_pairs(messages: dict[str, Message], lang: str | None = "en") -> tuple[list[dict[str, Any]], PairStats]:
    """Pairs (prompt messages, chosen = rank 0, rejected = the highest rank), one per reply group."""
    stats = PairStats(trees=len(roots(messages)))
    pairs = []
    parents = [m for m in messages.values() if any(c.role == "assistant" for c in m.children)]
    for parent in sorted(parents, key=lambda m: m.id):
        stats.groups += 1
        usable = []
        for reply in (c for c in parent.children if c.role == "assistant"):
            if reply.deleted:
                stats.dropped_replies["deleted"] += 1
            elif lang is not None and reply.lang != lang:
                stats.dropped_replies["other language"] += 1
            elif reply.rank is None:
                stats.dropped_replies["unranked"] += 1
            else:
                usable.append(reply)
        if len(usable) < 2:
            stats.skipped["fewer than two ranked replies"] += 1
            continue
        if parent.deleted:
            stats.skipped["deleted prompt"] += 1
            continue
        path = path_to(messages, parent)
        if path is None:
            stats.skipped["broken conversation (ancestor missing or deleted)"] += 1
            continue
        chosen, rejected = min(usable, key=_rank_key), max(usable, key=_rank_key)
        if chosen.rank == rejected.rank:
            stats.skipped["tied ranks"] += 1
            continue
        stats.kept += 1
        pairs.append({
            "prompt": as_chat(path), "chosen": chosen.text, "rejected": rejected.text,
            "chosen_rank": chosen.rank, "rejected_rank": rejected.rank, "parent_id": parent.id,
        })
    return pairs, stats


def oasst2_source(spec: str, split: str | None = None, revision: str | None = None) -> Source:
    """``hub:OWNER/NAME`` or a path (a file or a local copy of the dataset repository)."""
    if spec.startswith("hub:"):
        return Source(hub=spec[len("hub:"):], split=split, revision=revision)
    return Source(path=spec, split=split, revision=revision)


def oasst2_pairs_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="danube oasst2-pairs",
        description="Oasst2 message rows -> DPO preference pairs (.jsonl): chosen = rank 0, rejected = highest rank.",
    )
    parser.add_argument("input", help="Oasst2 rows: a .jsonl/.parquet file, a local copy of the dataset repository "
                                      "(huggingface-cli download --repo-type dataset OpenAssistant/oasst2 --local-dir "
                                      "DIR), or hub:OpenAssistant/oasst2 (datasets.load_dataset, offline from its cache)")
    parser.add_argument("output", help="pairs to write (.jsonl: prompt messages, chosen, rejected)")
    parser.add_argument("--split", default="train", help="split of a dataset directory or Hub id (default: train)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) with hub:")
    parser.add_argument("--lang", default="en", help="keep replies in this language (default: en; 'all' for every one)")
    args = parser.parse_args(argv)
    lang = None if args.lang == "all" else args.lang
    rows = Rows(oasst2_source(args.input, args.split, args.revision), SCHEMA)
    pairs, stats = preference_pairs(read_messages(rows), lang=lang)
    write_jsonl(pairs, args.output)
    print(f"read {rows.count:,} message rows from {rows.describe()}")
    print(stats.summary(lang))
    print(f"wrote {args.output}")
    return 0
