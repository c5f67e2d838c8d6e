"""Tokenize raw text into litdata token shards for pretraining (``danube prepare``).

Inputs are ``.txt`` (documents separated by blank lines), ``.jsonl`` / ``.jsonl.gz``
(one JSON object per line, text in ``text_field``) and ``.parquet`` (column ``text_field``).
Every document becomes ``[bos] + ids + [eos]``; the token stream is written as litdata
chunks readable with ``StreamingDataset(dir, item_loader=TokensLoader(block_size))``:

    OUT/train/   index.json + chunk-*.bin
    OUT/val/     held-out documents (chosen per document by a seeded hash of its text)
    OUT/manifest.json

Work is split into byte ranges (row groups for parquet) that a process pool tokenizes;
the main process writes the shards in input order, so the output does not depend on the
number of workers. The whole dataset is written into a temporary directory and renamed
into place at the end.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from danube.data.tokenizer import Tokenizer
from danube.files import check_output_dir, remove_stale_temps, replace_dir

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
FORMAT = "danube-token-shards/1"

# Text handed to one worker task: big enough to amortise the hand-off, small enough to
# spread a single large file over all workers (see _unit_bytes).
MAX_UNIT_BYTES = 16 << 20
MIN_UNIT_BYTES = 256 << 10
# Tokens per litdata item: chunks fill up to chunk_bytes in steps of this size.
ITEM_TOKENS = 1 << 18
# Documents per SentencePiece batch call.
ENCODE_BATCH = 512
# How many skipped lines per file are named in the log (all are counted).
LOG_BAD_LINES = 10

_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


class BadLine(ValueError):
    """A malformed input record; the message starts with ``FILE:LINE:``."""


def _suffix(path: Path) -> str | None:
    name = path.name
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def list_input_files(inputs: list[str | Path]) -> list[Path]:
    """Expand files and directories (recursively) into the supported input files, sorted."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and _suffix(p) and not p.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"{item}: no {', '.join(SUFFIXES)} files in this directory")
            files.extend(found)
        elif item.is_file():
            if not _suffix(item):
                raise ValueError(f"{item}: unsupported input type; expected one of {', '.join(SUFFIXES)}")
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


@dataclass
class _Unit:
    """A slice of one input file: a byte range of a text file, a whole .gz, or parquet row groups."""

    index: int
    source: int  # index into the list of input files
    path: str
    kind: str
    start: int = 0
    end: int = -1
    row_groups: list[int] = field(default_factory=list)
    first_row: int = 0
    nbytes: int = 0


def _split_points(path: Path, sep: re.Pattern, unit_bytes: int) -> list[int]:
    """Offsets just after a separator near every multiple of ``unit_bytes``: each range holds whole records."""
    size = path.stat().st_size
    points = [0]
    with open(path, "rb") as f:
        target = unit_bytes
        while target < size:
            pos, found = target, None
            while found is None and pos < size:
                f.seek(max(pos - 64, points[-1]))
                base = f.tell()
                window = f.read(1 << 20)
                m = sep.search(window)
                if m:
                    found = base + m.end()
                elif not window:
                    break
                pos = base + len(window)
            if found is None or found >= size:
                break
            points.append(found)
            target = found + unit_bytes
    points.append(size)
    return points


def _plan(files: list[Path], text_field: str, unit_bytes: int) -> list[_Unit]:
    units: list[_Unit] = []
    for source, path in enumerate(files):
        kind = _suffix(path)
        if kind in (".txt", ".jsonl"):
            sep = _BLANK_LINE if kind == ".txt" else re.compile(rb"\n")
            points = _split_points(path, sep, unit_bytes)
            for start, end in zip(points, points[1:]):
                units.append(_Unit(len(units), source, str(path), kind, start, end, nbytes=end - start))
        elif kind == ".jsonl.gz":
            units.append(_Unit(len(units), source, str(path), kind, nbytes=path.stat().st_size))
        else:
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(path).metadata
                schema = pq.read_schema(path)
            except Exception as err:  # pyarrow raises several types for a broken file
                raise ValueError(f"{path}: not a readable parquet file: {err}") from err
            if text_field not in schema.names:
                raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                                 "pass --text-field")
            import pyarrow as pa

            typ = schema.field(text_field).type
            if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
                raise ValueError(f"{path}: column {text_field!r} has type {typ}, expected string")
            groups: list[int] = []
            first_row = row = size = 0
            for g in range(meta.num_row_groups):
                if not groups:
                    first_row = row
                groups.append(g)
                size += meta.row_group(g).total_byte_size
                row += meta.row_group(g).num_rows
                if size >= unit_bytes or g == meta.num_row_groups - 1:
                    units.append(_Unit(len(units), source, str(path), kind, row_groups=groups,
                                       first_row=first_row, nbytes=size))
                    groups, size = [], 0
    return units


def _line_of(path: str, offset: int) -> int:
    """1-based line number of byte ``offset`` (only computed when a line is bad)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _read_unit(unit: _Unit, text_field: str) -> Iterator[tuple[str | None, str | None]]:
    """Yield ``(text, None)`` per document or ``(None, "FILE:LINE: what is wrong")`` per bad record."""
    if unit.kind == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(unit.path).read_row_groups(unit.row_groups, columns=[text_field])
        for i, text in enumerate(table.column(text_field).to_pylist()):
            if text is None:
                yield None, f"{unit.path}: row {unit.first_row + i}: {text_field!r} is null"
            else:
                yield text, None
        return
    if unit.kind == ".jsonl.gz":
        with gzip.open(unit.path, "rb") as f:
            try:
                for lineno, line in enumerate(f, 1):
                    yield _parse_json(line, text_field, lambda: f"{unit.path}:{lineno}")
            except (OSError, EOFError, zlib.error) as err:
                raise ValueError(f"{unit.path}: corrupt gzip file: {err}") from err
        return
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        data = f.read(unit.end - unit.start)
    if unit.kind == ".jsonl":
        pos = 0
        for line in data.splitlines(keepends=True):
            offset = unit.start + pos
            pos += len(line)
            yield _parse_json(line, text_field, lambda: f"{unit.path}:{_line_of(unit.path, offset)}")
        return
    # .txt: documents are runs of non-blank lines.
    doc: list[str] = []
    pos = 0
    for line in data.splitlines(keepends=True):
        offset = unit.start + pos
        pos += len(line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield None, f"{unit.path}:{_line_of(unit.path, offset)}: not valid UTF-8 ({err.reason} at byte {err.start})"
            continue
        if text.strip():
            doc.append(text)
        elif doc:
            yield "".join(doc).rstrip("\r\n"), None
            doc = []
    if doc:
        yield "".join(doc).rstrip("\r\n"), None


def _parse_json(line: bytes, text_field: str, where) -> tuple[str | None, str | None]:
    if not line.strip():
        return "", None  # a blank line is an empty document: counted, not an error
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"{where()}: not valid JSON ({err})"
    if not isinstance(record, dict):
        return None, f"{where()}: expected a JSON object, got {type(record).__name__}"
    if text_field not in record:
        return None, f"{where()}: no {text_field!r} field (keys: {', '.join(map(str, list(record)[:10]))})"
    text = record[text_field]
    if not isinstance(text, str):
        return None, f"{where()}: {text_field!r} is {type(text).__name__}, not a string"
    return text, None


def _is_val(text: str, seed: int, val_fraction: float) -> bool:
    """Deterministic per-document split: the same text (and seed) always lands in the same split."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, salt=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2**64


# ---- worker side: module-level functions so that any multiprocessing start method can pickle them

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _validate_unit(args: tuple[_Unit, str]) -> str | None:
    """The first bad record of a unit, or None."""
    unit, text_field = args
    for _, error in _read_unit(unit, text_field):
        if error:
            return error
    return None


def _tokenize_unit(args: tuple[_Unit, str, float, int, str]) -> dict:
    """Tokenize a unit; returns the per-split token streams and counts."""
    unit, text_field, val_fraction, seed, dtype = args
    tok = _worker_tokenizer
    assert tok is not None, "worker not initialised"
    prefix = [tok.bos_id] if tok.bos_id >= 0 else []
    out = {s: {"documents": 0, "tokens": 0, "arrays": []} for s in SPLITS}
    empty, bad, bad_messages = 0, 0, []
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        ids = tok.sp.encode([t for _, t in batch])
        for (split, _), doc in zip(batch, ids):
            arr = np.asarray(prefix + doc + [tok.eos_id], dtype=dtype)
            out[split]["arrays"].append(arr)
            out[split]["documents"] += 1
            out[split]["tokens"] += len(arr)
        batch.clear()

    for text, error in _read_unit(unit, text_field):
        if error:
            bad += 1
            if len(bad_messages) < LOG_BAD_LINES:
                bad_messages.append(error)
            continue
        if not text.strip():
            empty += 1
            continue
        batch.append(("val" if _is_val(text, seed, val_fraction) else "train", text))
        if len(batch) >= ENCODE_BATCH:
            flush()
    if batch:
        flush()
    for s in SPLITS:
        arrays = out[s].pop("arrays")
        out[s]["ids"] = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    return {"unit": unit.index, "source": unit.source, "empty": empty, "bad": bad, "bad_messages": bad_messages, **out}


# ---- main side


class _Pool:
    """A process pool, or the current process when ``num_workers <= 1`` (tests, tiny inputs)."""

    def __init__(self, num_workers: int, tokenizer_path: str) -> None:
        self.pool = None
        if num_workers > 1:
            # fork needs no importable __main__ (scripts without a main guard work); where
            # it is unavailable, spawn re-imports this module for the top-level functions.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(method)
            self.pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_path,))
        else:
            _init_worker(tokenizer_path)

    def imap(self, fn, items):
        return self.pool.imap(fn, items) if self.pool else map(fn, items)

    def close(self) -> None:
        if self.pool:
            self.pool.terminate()
            self.pool.join()


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None, file=sys.stderr)


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
        self.item_tokens = max(1, min(ITEM_TOKENS, _convert_bytes_to_int(chunk_bytes) // np.dtype(dtype).itemsize // 8))
        self.buffer = np.zeros(0, dtype=dtype)
        self.items = 0
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, ids]) if len(self.buffer) else ids
        while len(self.buffer) >= self.item_tokens:
            self._emit(self.buffer[: self.item_tokens])
            self.buffer = self.buffer[self.item_tokens :]

    def _emit(self, ids: np.ndarray) -> None:
        self.writer.add_item(self.items, np.ascontiguousarray(ids))
        self.items += 1
        self.tokens += len(ids)

    def finish(self) -> int:
        if len(self.buffer):
            self._emit(self.buffer)
        if self.items:
            self.writer.done()
            # One writer in one process: merge its index now instead of waiting for
            # (world_size x workers) indexes as litdata's merge() does under torch.distributed.
            self.writer._merge_no_wait()
        return len(list(self.directory.glob("*.bin")))


def prepare(
    inputs: list[str | Path],
    output_dir: str | Path,
    tokenizer: str | Path,
    text_field: str = "text",
    val_fraction: float = 0.01,
    num_workers: int = 2,
    chunk_bytes: str = "64MB",
    skip_bad: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Tokenize ``inputs`` into ``output_dir/{train,val}`` litdata shards plus ``manifest.json``.

    Args:
        inputs: Files or directories (searched recursively) of .txt, .jsonl, .jsonl.gz, .parquet.
        output_dir: Where the prepared dataset goes; must be absent or empty unless ``overwrite``.
        tokenizer: A SentencePiece ``.model`` file (or a directory holding ``tokenizer.model``).
        text_field: JSON field / parquet column holding the text.
        val_fraction: Expected fraction of documents held out for validation.
        num_workers: Tokenizer processes (1 tokenizes in this process).
        chunk_bytes: Size of each shard file, litdata style (``"64MB"``).
        skip_bad: Skip (and count) malformed records instead of failing.
        seed: Salt of the per-document train/val hash.
        overwrite: Replace an existing non-empty ``output_dir`` (only once the new one is complete).

    Returns:
        The manifest (also written to ``output_dir/manifest.json``).

    Raises:
        ValueError: A malformed record (``FILE:LINE: what``) without ``skip_bad``, raised
            before any shard is written; bad arguments; an output that would be clobbered.
    """
    import danube

    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    check_output_dir(output_dir, overwrite=overwrite, inputs=[*inputs, tokenizer])
    remove_stale_temps(output_dir.parent)
    tok = Tokenizer(tokenizer)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "int32"
    files = list_input_files(list(inputs))
    if not files:
        raise ValueError("no input files given")
    input_bytes = sum(f.stat().st_size for f in files)
    unit_bytes = int(min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, input_bytes / (max(num_workers, 1) * 8))))
    units = _plan(files, text_field, unit_bytes)
    total_bytes = sum(u.nbytes for u in units)
    log.info("preparing %d files (%.1f MB) in %d work units with %d workers", len(files), total_bytes / 1e6,
             len(units), max(1, num_workers))

    pool = _Pool(min(num_workers, len(units)), str(tok.model_file))
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")  # removed below, or by a later run if killed
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if not skip_bad:
            # Validate everything first: a bad line fails the run before any shard exists.
            with _progress(total_bytes, "checking") as bar:
                for unit, error in zip(units, pool.imap(_validate_unit, [(u, text_field) for u in units])):
                    if error:
                        raise BadLine(f"{error} (pass --skip-bad to skip and count such records)")
                    bar.update(unit.nbytes)
        tmp.mkdir(parents=True)
        writers = {s: _ShardWriter(tmp / s, chunk_bytes, dtype) for s in SPLITS}
        per_source = [
            {"path": str(f), "empty_documents": 0, "bad_lines": 0,
             **{s: {"documents": 0, "tokens": 0} for s in SPLITS}}
            for f in files
        ]
        args = [(u, text_field, val_fraction, seed, dtype) for u in units]
        with _progress(total_bytes, "tokenizing") as bar:
            for unit, result in zip(units, pool.imap(_tokenize_unit, args)):
                src = per_source[result["source"]]
                src["empty_documents"] += result["empty"]
                src["bad_lines"] += result["bad"]
                for message in result["bad_messages"]:
                    log.warning("skipped %s", message)
                for s in SPLITS:
                    src[s]["documents"] += result[s]["documents"]
                    src[s]["tokens"] += result[s]["tokens"]
                    writers[s].add(result[s]["ids"])
                bar.update(unit.nbytes)
        chunks = {s: writers[s].finish() for s in SPLITS}
        totals = {
            s: {"documents": sum(p[s]["documents"] for p in per_source),
                "tokens": sum(p[s]["tokens"] for p in per_source), "chunks": chunks[s]}
            for s in SPLITS
        }
        for s in SPLITS:
            assert totals[s]["tokens"] == writers[s].tokens, "token count mismatch between workers and writer"
        if totals["train"]["tokens"] == 0:
            raise ValueError(f"no training documents in {[str(f) for f in files]} (all empty, bad or held out)")
        manifest = {
            "format": FORMAT,
            "danube_version": danube.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tokenizer": {"path": str(tok.model_file.resolve()), "checksum": tok.checksum,
                          "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
            "dtype": dtype,
            "text_field": text_field,
            "val_fraction": val_fraction,
            "seed": seed,
            "input_bytes": total_bytes,
            "sources": per_source,
            "totals": {**totals,
                       "documents": totals["train"]["documents"] + totals["val"]["documents"],
                       "tokens": totals["train"]["tokens"] + totals["val"]["tokens"],
                       "empty_documents": sum(p["empty_documents"] for p in per_source),
                       "bad_lines": sum(p["bad_lines"] for p in per_source)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if output_dir.exists() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        replace_dir(tmp, output_dir)
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    t = manifest["totals"]
    if t["bad_lines"]:
        log.warning("skipped %d malformed records (counts per file in %s)", t["bad_lines"], output_dir / MANIFEST)
    if t["empty_documents"]:
        log.info("skipped %d empty documents", t["empty_documents"])
    elapsed = time.perf_counter() - t0
    log.info("wrote %s: train %d tokens (%d docs), val %d tokens (%d docs) in %.1fs (%.2f MB/s)", output_dir,
             t["train"]["tokens"], t["train"]["documents"], t["val"]["tokens"], t["val"]["documents"], elapsed,
             total_bytes / 1e6 / max(elapsed, 1e-9))
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared directory, with a clear error when it is not one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a prepared dataset: no {MANIFEST} (make one with `danube prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a danube manifest (expected format {FORMAT!r})")
    return manifest


def check_tokenizer(shard_dir: str | Path, tokenizer_checksum: str) -> None:
    """Raise if the shards in ``shard_dir`` were made with a tokenizer other than ``tokenizer_checksum``."""
    info = read_manifest(shard_dir)["tokenizer"]
    if info["checksum"] != tokenizer_checksum:
        raise ValueError(
            f"{shard_dir} was tokenized with {info['path']} (sha256 {info['checksum']}), but the model uses a "
            f"tokenizer with sha256 {tokenizer_checksum}; re-run `danube prepare` with the model's tokenizer"
        )


def prepare_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="danube prepare",
        description="Tokenize .txt/.jsonl/.jsonl.gz/.parquet files (or directories of them) into litdata "
        "token shards: OUT/train, OUT/val and OUT/manifest.json.",
    )
    parser.add_argument("inputs", nargs="+", help="input files or directories")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    parser.add_argument("--text-field", default="text", help="JSON field / parquet column with the text")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    parser.add_argument("--chunk-bytes", default="64MB", help="size of each shard file")
    parser.add_argument("--seed", type=int, default=0, help="salt of the train/val split")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    m = prepare(args.inputs, args.output, args.tokenizer, args.text_field, args.val_fraction, args.workers,
                args.chunk_bytes, args.skip_bad, args.seed, args.overwrite)
    t = m["totals"]
    print(f"train: {t['train']['tokens']:,} tokens in {t['train']['documents']:,} documents")
    print(f"val:   {t['val']['tokens']:,} tokens in {t['val']['documents']:,} documents")
    if t["bad_lines"] or t["empty_documents"]:
        print(f"skipped: {t['bad_lines']:,} malformed records, {t['empty_documents']:,} empty documents")
    print(f"wrote {args.output}")
    return 0
