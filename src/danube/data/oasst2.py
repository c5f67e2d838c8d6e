"""OpenAssistant (Oasst2) message trees: conversations for SFT, ranked preference pairs for DPO.

Oasst2 is published as one row per message (``message_id``, ``parent_id``, ``role`` =
prompter | assistant, ``rank`` among its siblings, 0 = best, or null, ``lang``,
``deleted``, ``text``, ...). Export it with ``datasets``: ``load_dataset(
"OpenAssistant/oasst2", split="train").to_json("oasst2_train.jsonl")``.

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
from typing import Any

from danube.data.records import RecordError, read_jsonl, require, write_jsonl

log = logging.getLogger(__name__)

ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class Message:
    id: str
    parent_id: str | None
    role: str  # prompter | assistant
    text: str
    rank: int | None
    lang: str | None
    deleted: bool
    children: list["Message"] = field(default_factory=list)


def read_messages(path: str | Path) -> dict[str, Message]:
    """Every message row of ``path``, linked to its children; malformed rows name their line."""
    messages: dict[str, Message] = {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        require(row, ("message_id", "parent_id", "role", "text"), where, "Oasst2 message")
        if row["role"] not in ROLES:
            raise RecordError(f"{where}: role {row['role']!r}; Oasst2 roles are {sorted(ROLES)}")
        rank = row.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank != int(rank)):
            raise RecordError(f"{where}: rank must be an integer or null, got {rank!r}")
        if not isinstance(row["text"], str):
            raise RecordError(f"{where}: field 'text' must be a string")
        mid = str(row["message_id"])
        if mid in messages:
            raise RecordError(f"{where}: message_id {mid} appears twice")
        messages[mid] = Message(
            id=mid, parent_id=None if row["parent_id"] is None else str(row["parent_id"]), role=row["role"],
            text=row["text"], rank=None if rank is None else int(rank), lang=row.get("lang"),
            deleted=bool(row.get("deleted", False)),
        )
    for m in messages.values():
        if m.parent_id is not None and m.parent_id in messages:
            messages[m.parent_id].children.append(m)
    return messages


def roots(messages: dict[str, Message]) -> list[Message]:
    return [m for m in messages.values() if m.parent_id is None]


def path_to(messages: dict[str, Message], message: Message) -> list[Message] | None:
    """Root..message, or None when an ancestor is missing or deleted."""
    path = [message]
    while path[-1].parent_id is not None:
        parent = messages.get(path[-1].parent_id)
        if parent is None or parent.deleted:
            return None
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
        conversations.append(as_chat(path))
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


def oasst2_pairs_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="danube oasst2-pairs",
        description="Oasst2 message rows (.jsonl) -> DPO preference pairs: chosen = rank 0, rejected = highest rank.",
    )
    parser.add_argument("input", help="Oasst2 rows, one JSON object per line (message_id, parent_id, role, rank, ...)")
    parser.add_argument("output", help="pairs to write (.jsonl: prompt messages, chosen, rejected)")
    parser.add_argument("--lang", default="en", help="keep replies in this language (default: en; 'all' for every one)")
    args = parser.parse_args(argv)
    lang = None if args.lang == "all" else args.lang
    pairs, stats = preference_pairs(read_messages(args.input), lang=lang)
    write_jsonl(pairs, args.output)
    print(stats.summary(lang))
    print(f"wrote {args.output}")
    return 0
