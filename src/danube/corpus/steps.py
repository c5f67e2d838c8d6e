"""danube's corpus steps as datatrove pipeline steps: read a task's units, tokenize into litdata shards.

A task (one datatrove rank) owns a contiguous run of the plan's units (:mod:`danube.corpus.plan`)
and works in ``WORK/tasks/NNNNN.tmp``, renamed to ``WORK/tasks/NNNNN`` only once all of its shards
and counts are written: a killed task leaves a ``.tmp`` that its rerun deletes and redoes from
its start, and a finished task is never read half-written. A bad record (without
``skip_bad``) stops the task: it is named in ``WORK/errors/NNNNN.txt`` and the task commits
nothing, so the run cannot be assembled until the input is fixed or skipped.

The steps pass datatrove ``Document`` s between them, so datatrove's own filters (and
danube's quality steps) go between the reader and the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

SPLITS = ("train", "val")
# Tokens per litdata item: chunks fill up to chunk_bytes in steps of this size.
ITEM_TOKENS = 1 << 18
# Documents per SentencePiece batch call.
ENCODE_BATCH = 512
# How many bad records per task are named in its counts (all are counted).
NAMED_BAD_RECORDS = 10
FAILED = "FAILED"


def task_dir(work: str | Path, rank: int, tmp: bool = False) -> Path:
    return Path(work) / "tasks" / (f"{rank:05d}.tmp" if tmp else f"{rank:05d}")


def error_file(work: str | Path, rank: int) -> Path:
    return Path(work) / "errors" / f"{rank:05d}.txt"


def commit_task(work: str | Path, rank: int) -> None:
    """The task's output is whole: its directory takes its final name (a rerun skips the task)."""
    done = task_dir(work, rank)
    shutil.rmtree(done, ignore_errors=True)
    os.replace(task_dir(work, rank, tmp=True), done)


def task_failed(work: str | Path, rank: int) -> bool:
    """Whether the task's reader stopped at a bad record (or never started): nothing of it is kept."""
    tmp = task_dir(work, rank, tmp=True)
    return not tmp.is_dir() or (tmp / FAILED).exists()


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def _guarded(reads):
    """``reads``, with a file that cannot be read on (a corrupt stream) as one last bad record."""
    from danube.corpus.inputs import BadRecord, Read

    try:
        yield from reads
    except BadRecord as err:
        yield Read(None, str(err))


class ReadUnits(PipelineStep):
    """The reader: this task's units of the plan, as documents (``metadata["source"]``: the input's index;
    with ``records``, ``metadata["record"]``: the whole input record, for steps that write records)."""

    name = "danube units"
    type = "📖 - READER"

    def __init__(self, work_dir: str, text_field: str = "text", skip_bad: bool = False, records: bool = False) -> None:
        super().__init__()
        self.work_dir, self.text_field, self.skip_bad, self.records = str(work_dir), text_field, skip_bad, records

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from danube.corpus.inputs import Unit, read_unit
        from danube.corpus.plan import load_plan

        if data:
            yield from data
        plan = load_plan(self.work_dir)
        if world_size != len(plan["tasks"]):
            raise ValueError(f"{self.work_dir}: the plan has {len(plan['tasks'])} tasks, the executor {world_size}")
        tmp = task_dir(self.work_dir, rank, tmp=True)
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier, killed try of this task
        tmp.mkdir(parents=True)
        error_file(self.work_dir, rank).unlink(missing_ok=True)
        counts: dict[int, dict] = {}
        named: list[str] = []
        for u in plan["tasks"][rank]:
            unit = Unit(**plan["units"][u])
            c = counts.setdefault(unit.source, {"bad_records": 0, "empty_documents": 0})
            for i, (text, error, record) in enumerate(_guarded(read_unit(unit, self.text_field, self.records))):
                if error is not None:
                    if not self.skip_bad:
                        self._fail(rank, tmp, error)
                        return
                    c["bad_records"] += 1
                    self.stat_update("bad_records")
                    if len(named) < NAMED_BAD_RECORDS:
                        named.append(error)
                    continue
                if not text.strip() and not self.records:  # a filter sees (and judges) empty documents
                    c["empty_documents"] += 1
                    self.stat_update("empty_documents")
                    continue
                self.stat_update("documents")
                meta = {"source": unit.source, **({"record": record} if self.records else {})}
                yield Document(text=text, id=f"{unit.index}/{i}", metadata=meta)
        _write_json(tmp / "read.json", {"sources": counts, "bad_records": named})

    def _fail(self, rank: int, tmp: Path, error: str) -> None:
        from datatrove.utils.logging import logger

        path = error_file(self.work_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(error + "\n")
        (tmp / FAILED).write_text(error + "\n")
        logger.warning(f"stopped at a bad record: {error}")  # the task log; the run ends naming it


class _ShardWriter:
    """One split's litdata writer, fed a token stream in fixed-size items."""

    def __init__(self, directory: Path, chunk_bytes: str, dtype: str) -> None:
        from litdata.streaming.item_loader import TokensLoader
        from litdata.streaming.writer import BinaryWriter
        from litdata.utilities.format import _convert_bytes_to_int

        directory.mkdir(parents=True)
        self.directory = directory
        self.writer = BinaryWriter(str(directory), chunk_bytes=chunk_bytes, item_loader=TokensLoader())
        # A chunk closes after the item that crosses chunk_bytes: items of 1/8 chunk keep
        # chunks near the requested size.
        per_chunk = _convert_bytes_to_int(chunk_bytes) // np.dtype(dtype).itemsize
        self.item_tokens = max(1, min(ITEM_TOKENS, per_chunk // 8))
        self.buffer = np.zeros(0, dtype=dtype)
        self.items = 0
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, ids]) if len(self.buffer) else ids
        while len(self.buffer) >= self.item_tokens:
            self._emit(self.buffer[: self.item_tokens])
            self.buffer = self.buffer[self.item_tokens:]

    def _emit(self, ids: np.ndarray) -> None:
        self.writer.add_item(self.items, np.ascontiguousarray(ids))
        self.items += 1
        self.tokens += len(ids)

    def finish(self) -> None:
        if len(self.buffer):
            self._emit(self.buffer)
        if self.items:
            self.writer.done()
            # One writer in one process: merge its index now instead of waiting for
            # (world_size x workers) indexes as litdata's merge() does under torch.distributed.
            self.writer._merge_no_wait()


def is_val(text: str, seed: int, val_fraction: float) -> bool:
    """Deterministic per-document split: the same text (and seed) always lands in the same split."""
    import hashlib

    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, salt=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2**64


class TokenizeShards(PipelineStep):
    """The writer: ``[bos] + ids + [eos]`` per document into this task's train/val litdata shards."""

    name = "danube token shards"
    type = "💽 - WRITER"

    def __init__(self, work_dir: str, tokenizer: str, val_fraction: float, seed: int, chunk_bytes: str,
                 dtype: str) -> None:
        super().__init__()
        self.work_dir, self.tokenizer = str(work_dir), str(tokenizer)
        self.val_fraction, self.seed, self.chunk_bytes, self.dtype = val_fraction, seed, chunk_bytes, dtype

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from danube.data.tokenizer import Tokenizer

        tok = Tokenizer(self.tokenizer)
        prefix = [tok.bos_id] if tok.bos_id >= 0 else []
        tmp = task_dir(self.work_dir, rank, tmp=True)  # made (afresh) by the reader as it starts
        writers: dict[str, _ShardWriter] = {}
        sources: dict[int, dict] = {}
        batch: list[tuple[str, int, str]] = []

        def flush() -> None:
            with self.track_time("batch"):
                ids = tok.sp.encode([text for _, _, text in batch], num_threads=1)  # a task is one core
            for (split, source, _), doc in zip(batch, ids):
                arr = np.asarray(prefix + doc + [tok.eos_id], dtype=self.dtype)
                if split not in writers:
                    writers[split] = _ShardWriter(tmp / split, self.chunk_bytes, self.dtype)
                writers[split].add(arr)
                c = sources.setdefault(source, {s: {"documents": 0, "tokens": 0} for s in SPLITS})
                c[split]["documents"] += 1
                c[split]["tokens"] += len(arr)
                self.stat_update(f"{split}_tokens", value=len(arr))
            batch.clear()

        for doc in data or ():
            split = "val" if is_val(doc.text, self.seed, self.val_fraction) else "train"
            batch.append((split, int(doc.metadata.get("source", 0)), doc.text))
            if len(batch) >= ENCODE_BATCH:
                flush()
        if batch:
            flush()
        if task_failed(self.work_dir, rank):
            return  # the reader stopped at a bad record: nothing of this task is kept
        for w in writers.values():
            w.finish()
        read = json.loads((tmp / "read.json").read_text()) if (tmp / "read.json").exists() else {"sources": {}}
        _write_json(tmp / "shards.json", {
            "tokens": {s: writers[s].tokens if s in writers else 0 for s in SPLITS},
            "sources": {str(k): v for k, v in sources.items()},
            "read": read,
        })
        commit_task(self.work_dir, rank)
        yield from ()
