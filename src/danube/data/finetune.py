"""Fine-tuning data: chat sources read into tokenized items, the optimizer-step plan, the DataModule.

What SFT and DPO share; the formats themselves are :mod:`danube.data.sft` (conversations)
and :mod:`danube.data.preference` (pairs). Every source is read and tokenized one record
at a time (:func:`build_items`), optionally cut to a seeded subsample of its records
(:func:`subsample`), a seeded fraction or a split of its own held out; the
items are then laid out as optimizer steps -> ranks -> micro-batches (:func:`step_plan`),
the same on every rank, so that each micro-batch knows the trained-token count of its
whole step (:class:`StepBatches`). :class:`FinetuneDataModule` serves a rank its share,
as :class:`danube.data.pretrain.PretrainDataModule` does for pretraining.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

import lightning as L
import torch

from danube.data.chat import TrainingTokenizer
from danube.data.records import ReadStats
from danube.data.workers import worker_init

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subsample:
    """A source's ``max_rows`` or ``fraction`` (one of them), with the seed of the choice."""

    max_rows: int | None = None
    fraction: float | None = None
    seed: int = 0

    def count(self, available: int) -> int:
        """Records kept of ``available``: ``max_rows`` (all if fewer), or ``fraction`` of them rounded half up, at least 1."""
        if self.max_rows is not None:
            return min(self.max_rows, available)
        return min(available, max(1, math.floor(self.fraction * available + 0.5))) if available else 0

    def describe(self) -> str:
        what = f"max_rows={self.max_rows}" if self.max_rows is not None else f"fraction={self.fraction}"
        return f"{what}, seed {self.seed}"


@dataclass
class SourceData:
    """One ``chat_data`` source, resolved: its rows, its held-out rows (``val_split``), format, language, subsample."""

    name: str
    format: str
    lang: str | None
    rows: Any  # danube.data.records.Rows
    val_rows: Any = None
    subsample: Subsample | None = None



@dataclass(frozen=True)
class ItemSettings:
    """How sources become items: the loss they are for, the length limit, packing, the held-out share."""

    loss: str  # sft | dpo
    max_seq_len: int
    truncation: str = "truncate"  # SFT: truncate | drop overlong samples
    packing: bool = False  # SFT: pack samples into rows of max_seq_len
    val_fraction: float = 0.0
    seed: int = 0


# -- reading and tokenizing ------------------------------------------------------------------
@dataclass
class SourceCounts:
    """What one source gave, for the log's table and ``metrics.json``."""

    rows: int = 0
    kept: int = 0  # conversations (SFT) or pairs (DPO) read: what the source has
    dropped: int = 0  # by the reader (trees, reply groups, identical pairs)
    used: int = 0  # of those kept, the ones trained on (all but with max_rows or fraction)
    items: int = 0  # tokenized samples or pairs kept
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0  # SFT: answer tokens; DPO: completion tokens

    def add(self, other: "SourceCounts") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


def _item_tokens(item) -> tuple[int, int]:
    if hasattr(item, "chosen"):  # a tokenized preference pair: two whole rows, completions at their ends
        completions = len(item.chosen) - item.chosen_start + len(item.rejected) - item.rejected_start
        return len(item.chosen) + len(item.rejected), completions
    return len(item.input_ids), item.loss_tokens


def subsample_key(seed: int, source: str, index: int) -> int:
    """The seeded rank of a source's ``index``-th record: a subsample keeps the records with the smallest keys."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{source}:{index}".encode(), digest_size=8).digest(), "big")


def subsample(records: Iterable, source: str, sub: Subsample, used: list[int] | None = None) -> Iterator:
    """The records of ``source`` whose keys (:func:`subsample_key`) are the ``sub.count(n)`` smallest, in read order.

    The choice depends only on the seed, the source's name and the records' positions in
    it (never on the other sources, their order, the workers or the devices), so a run and
    its restart train on the same records, and a larger ``max_rows`` keeps the smaller's
    records and more. ``max_rows`` streams, holding at most that many records; ``fraction``
    holds the source's records until it knows their count. ``used`` gets the count kept.
    """
    if sub.max_rows is not None:
        heap: list[tuple[int, int, Any]] = []  # (-key, -index, record): the largest key on top
        for i, record in enumerate(records):
            entry = (-subsample_key(sub.seed, source, i), -i, record)
            if len(heap) < sub.max_rows:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)
        chosen = sorted((-neg_i, record) for _, neg_i, record in heap)
    else:
        held = list(records)
        k = sub.count(len(held))
        keep = set(heapq.nsmallest(k, range(len(held)), key=lambda i: (subsample_key(sub.seed, source, i), i)))
        chosen = [(i, record) for i, record in enumerate(held) if i in keep]
    if used is not None:
        used.append(len(chosen))
    for _, record in chosen:
        yield record


def read_source(data: SourceData, rows, tok: TrainingTokenizer, label: str, settings: ItemSettings,
                sub: Subsample | None = None) -> tuple[list, Counter, SourceCounts]:
    """Read and tokenize one split of one source, streaming (only the tokenized items are held).

    With ``sub``, only its subsample of the records read is tokenized.
    """
    max_len = settings.max_seq_len
    stats = ReadStats()
    used: list[int] = []
    if settings.loss == "sft":
        from danube.data.sft import iter_conversations, tokenize_conversations

        records = iter_conversations(rows, data.format, lang=data.lang, stats=stats)
        if sub is not None:
            records = subsample(records, data.name, sub, used)
        items, c = tokenize_conversations(tok, records, max_len, settings.truncation, source=label)
        what = "conversations"
    else:
        from danube.data.preference import iter_pairs, tokenize_pairs

        records = iter_pairs(rows, data.format, lang=data.lang, stats=stats)
        if sub is not None:
            records = subsample(records, data.name, sub, used)
        items, c = tokenize_pairs(tok, records, max_len, source=label)
        what = "pairs"
    if sub is not None:
        log.info("%s: %s -> %d of %d %s", label, sub.describe(), used[0], stats.kept, what)
    tokens = [_item_tokens(x) for x in items]
    n = SourceCounts(rows=stats.rows, kept=stats.kept, dropped=sum(stats.dropped.values()),
                     used=used[0] if used else stats.kept, items=len(items),
                     truncated=sum(v for k, v in c.items() if "truncated" in k),
                     tokens=sum(t for t, _ in tokens), trained_tokens=sum(t for _, t in tokens))
    log.info("%s: %s; %d %s tokenized -> %d (%s); %s tokens, %s trained", label, stats.summary(what), stats.kept,
             what, len(items), ", ".join(f"{v} {k}" for k, v in c.items() if k != "samples") or "none cut or dropped",
             f"{n.tokens:,}", f"{n.trained_tokens:,}")
    return items, c, n


def hold_out(items: list, fraction: float, seed: int, name: str) -> tuple[list, list]:
    """(kept for training, held out): a seeded ``fraction`` of ``items``, the same on every rank and run."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(random.Random(f"{seed}:{name}").sample(range(len(items)), n_val))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def log_table(loss: str, lines: list[tuple[str, str | None, SourceCounts, int]], val_items: int) -> SourceCounts:
    """Log what was read, per source and in all; returns the training total.

    ``lines``: (source, split, counts, items held out); a source's ``val_split`` has a
    line of its own, named ``NAME (val)``, whose items are all held out. ``used`` is what
    a source's ``max_rows`` or ``fraction`` kept of its conversations or pairs (all of
    them without). The report's SFT mix totals 157k samples: this is the table to compare
    with it.
    """
    item = "conversations" if loss == "sft" else "pairs"
    total = SourceCounts()
    for name, _, n, _ in lines:
        if not name.endswith("(val)"):
            total.add(n)
    head = ("source", "split", "rows", item, "dropped", "used", "items", "truncated", "tokens", "trained", "held out")
    cells = [head]
    for name, split, n, held in [*lines, ("total", "", total, val_items)]:
        cells.append((name, "-" if split is None else split,
                      *(f"{v:,}" for v in (n.rows, n.kept, n.dropped, n.used, n.items, n.truncated, n.tokens,
                                           n.trained_tokens, held))))
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    text = "\n".join("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)
    log.info("chat data read (%s; items: %s after tokenization; held out: for validation):\n%s", loss,
             "samples" if loss == "sft" else "pairs", text)
    return total


def build_items(sources: dict[str, SourceData], tok: TrainingTokenizer, settings: ItemSettings
                ) -> tuple[list, list, Callable[[list], dict[str, torch.Tensor]], dict[str, Any]]:
    """Tokenized training and validation items (SFT: rows, packed or not; DPO: pairs), the collate function, counts.

    A source's subsample (``max_rows`` or ``fraction``) is taken from its training split
    before tokenization. Validation items come from a source's ``val_split`` when it has
    one (whole), else from a seeded ``val_fraction`` of its (subsampled) items (none by
    default: the report holds nothing out). ``counts["sources"]`` holds each source's line
    of the table.
    """
    max_len, fraction = settings.max_seq_len, settings.val_fraction
    counts: Counter = Counter()
    items: list = []
    val_items: list = []
    lines: list[tuple[str, str | None, SourceCounts, int]] = []
    for name, data in sources.items():
        got, c, n = read_source(data, data.rows, tok, name, settings, data.subsample)
        counts.update(c)
        if data.val_rows is not None:
            held, _, n_val = read_source(data, data.val_rows, tok, f"{name} (validation)", settings)
            lines += [(name, data.rows.split, n, 0), (f"{name} (val)", data.val_rows.split, n_val, len(held))]
        else:
            got, held = hold_out(got, fraction, settings.seed, name)
            lines.append((name, data.rows.split, n, len(held)))
        items += got
        val_items += held
    total = log_table(settings.loss, lines, len(val_items))
    counts.update({"rows": total.rows, "used": total.used, "tokens": total.tokens,
                   "trained_tokens": total.trained_tokens, "validation_items": len(val_items)})
    by_source = {name: {**vars(n), "held_out": held} for name, _, n, held in lines}
    if fraction > 0 and not val_items:
        log.warning("train.val_fraction=%s held nothing out (too few items)", fraction)
    if settings.loss == "sft":
        from danube.data.sft import collate, pack_samples

        if settings.packing:
            n = len(items)
            items, val_items = pack_samples(items, max_len), pack_samples(val_items, max_len)
            log.info("packing: %d samples -> %d rows of at most %d tokens", n, len(items), max_len)
        return items, val_items, partial(collate, pad_id=tok.pad_id), {**counts, "sources": by_source}
    from danube.data.preference import collate_pairs

    counts["pairs"] = total.items
    return items, val_items, partial(collate_pairs, pad_id=tok.pad_id), {**counts, "sources": by_source}


class MicroBatches(torch.utils.data.Dataset):
    """This rank's share of ``items`` in micro-batches, in order, each item counted once (validation).

    Every rank gets the same number of micro-batches, so that all of them run the
    validation pass and its reduce: a rank short of one repeats the first micro-batch
    with ``counted`` 0, which the validation step multiplies its sums by.
    """

    def __init__(self, items: list, micro_batch_size: int, rank: int, world_size: int, collate_fn) -> None:
        self.items, self.collate_fn = items, collate_fn
        chunks = [list(range(s, min(s + micro_batch_size, len(items)))) for s in range(0, len(items), micro_batch_size)]
        mine = [(c, True) for c in chunks[rank::world_size]]
        self.batches = mine + [(chunks[0], False)] * (-(-len(chunks) // world_size) - len(mine))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        indices, counted = self.batches[i]
        batch = self.collate_fn([self.items[j] for j in indices])
        batch["counted"] = torch.tensor(float(counted))
        return batch


class FinetuneDataModule(L.LightningDataModule):
    """This rank's micro-batches of a fixed step plan (built the same on every rank); see :func:`finetune_datamodule`."""

    def __init__(self, items: list, plan: list, collate_fn, num_workers: int = 0) -> None:
        super().__init__()
        self.items, self.plan, self.collate_fn, self.num_workers = items, plan, collate_fn, num_workers

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self):
        dataset = StepBatches(self.items, self.plan, self._rank()[0], self.collate_fn)
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                           worker_init_fn=worker_init if self.num_workers else None)


class FinetuneDataModuleWithValidation(FinetuneDataModule):
    """The same, plus the held-out items (Lightning validates only where ``val_dataloader`` exists)."""

    def __init__(self, items: list, plan: list, collate_fn, val_items: list, micro_batch_size: int,
                 num_workers: int = 0) -> None:
        super().__init__(items, plan, collate_fn, num_workers)
        self.val_items, self.micro_batch_size = val_items, micro_batch_size

    def val_dataloader(self):
        rank, ws = self._rank()
        dataset = MicroBatches(self.val_items, self.micro_batch_size, rank, ws, self.collate_fn)
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                           worker_init_fn=worker_init if self.num_workers else None)


def finetune_datamodule(items: list, plan: list, collate_fn, *, val_items: list | None = None, micro_batch_size: int = 1,
                        num_workers: int = 0) -> FinetuneDataModule:
    """The DataModule of a step plan; with held-out items, one that validates on them as well."""
    if val_items:
        return FinetuneDataModuleWithValidation(items, plan, collate_fn, val_items, micro_batch_size, num_workers)
    return FinetuneDataModule(items, plan, collate_fn, num_workers)


# -- optimizer steps -----------------------------------------------------------------------
def step_plan(n_items: int, micro_batch_size: int, accumulate: int, world_size: int, epochs: int, seed: int,
              shuffle: bool = True) -> list[list[list[list[int]]]]:
    """Item indices as steps -> ranks -> micro-batches -> items, the same on every rank.

    Every optimizer step holds ``accumulate`` micro-batches per rank (the last step may
    hold fewer, equally on every rank). Items that cannot give every rank a micro-batch
    at the very end are left out (counted in the log).
    """
    order: list[int] = []
    for epoch in range(epochs):
        perm = list(range(n_items))
        if shuffle:
            random.Random(seed + epoch).shuffle(perm)
        order += perm
    # Epochs run back to back in one stream, so every step but the very last is full:
    # Lightning's accumulation boundaries (every `accumulate` micro-batches) then match.
    micro = [order[i: i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    usable = len(micro) // world_size * world_size
    left_out = sum(len(m) for m in micro[usable:])
    micro = micro[:usable]
    per_step = accumulate * world_size
    steps = []
    for s in range(0, len(micro), per_step):
        chunk = micro[s: s + per_step]
        steps.append([chunk[r::world_size] for r in range(world_size)])
    if left_out:
        log.info("%d samples left out at the end (too few to give each of %d ranks a micro-batch)", left_out, world_size)
    return steps


class StepBatches(torch.utils.data.Dataset):
    """This rank's micro-batches, in order, each carrying its optimizer step's loss-token count.

    ``step_loss_tokens`` counts the trained tokens of every micro-batch of the step on
    every rank, so each micro-batch can divide its summed token loss by the count of the
    whole optimizer step: accumulated gradients then equal one big batch's gradient.
    """

    def __init__(self, items: Sequence[Any], plan: list[list[list[list[int]]]], rank: int,
                 collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
                 count: Callable[[Any], int] = lambda x: x.loss_tokens) -> None:
        self.items, self.collate_fn = items, collate_fn
        self.batches: list[tuple[list[int], int]] = []  # (indices, the step's loss tokens)
        for step in plan:
            total = sum(count(items[i]) for ranks in step for micro in ranks for i in micro)
            for micro in step[rank]:
                self.batches.append((micro, total))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        indices, total = self.batches[i]
        batch = self.collate_fn([self.items[j] for j in indices])
        batch["step_loss_tokens"] = torch.tensor(total)
        return batch


def micro_batches_per_step(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient accumulation giving ``batch_size`` samples per optimizer step over all ranks."""
    per_pass = micro_batch_size * world_size
    if batch_size % per_pass:
        raise ValueError(
            f"train.batch_size={batch_size} is not a multiple of train.micro_batch_size={micro_batch_size} x "
            f"{world_size} device(s)"
        )
    return max(1, math.ceil(batch_size / per_pass))
