"""Records of chat data wherever they are: files, local copies of Hub datasets, the Hub.

A ``chat_data`` source (and the input of ``danube oasst2-pairs``) is one of:

=================================  =============================================================
``path: FILE.jsonl``               one JSON object per line
``path: FILE.json``                one JSON array of objects (MetaMathQA), or JSON Lines
``path: FILE.parquet``             Parquet, read with pyarrow one record batch at a time
``path: DIR``, ``split``           a local copy of a Hub dataset repository, as
                                   ``huggingface-cli download --repo-type dataset ID --local-dir
                                   DIR`` or ``snapshot_download`` leave it. ``datasets`` decides
                                   which files make up each split (the README's ``configs``, else
                                   file names such as ``data/train_sft-00000-of-00003-<hash>.parquet``);
                                   each file is then read as above
``hub: OWNER/NAME``, ``split``,    ``datasets.load_dataset``: downloaded once into its cache and
``revision`` (optional)            memory-mapped from there; offline (``HF_HUB_OFFLINE=1``) it
                                   reads the cache only
=================================  =============================================================

Records are yielded one at a time with where they came from (``FILE:LINE``, ``FILE: row N``,
``OWNER/NAME[split] row N``; rows count from 0 as in ``datasets``), so a large file is never
held twice in memory. A missing column fails before anything is read where the schema can be
seen (Parquet footers, the Hub dataset's features), else at the first record without it,
naming the source, the file, the column and the schema the format expects.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from danube.files import atomic_file

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SOURCE_KEYS = ("path", "hub", "split", "revision")


class RecordError(ValueError):
    """A malformed record: the message starts with where it is (``FILE:LINE:``, ``FILE: row N:``)."""


class SourceError(ValueError):
    """A source that cannot be read as configured: unknown split, missing column, unreadable file."""


# -- files ------------------------------------------------------------------------------------
def _not_utf8(path: Path, lineno: int, raw: bytes, err: UnicodeDecodeError) -> RecordError:
    return RecordError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                       "re-encode the file as UTF-8")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            # Decoded line by line, so that a bad byte is reported with its line.
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, lineno, raw, err) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}:{lineno}: not valid JSON: {err}") from err
            if not isinstance(record, dict):
                hint = " (a JSON array? it must be the whole file: name it .json)" if isinstance(record, list) else ""
                raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}{hint}")
            yield lineno, record


def read_json_array(path: str | Path, chunk_bytes: int = 1 << 20) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """``(element index, line, object)`` for every element of a file holding one JSON array.

    ``datasets`` reads such a file whole (``json.loads``, then a JSON Lines copy, then
    Arrow): 1.8 GB more resident memory for a 329 MiB array (BENCHMARKS.md, "Reading chat
    data"). Here the standard library's ``raw_decode`` takes one element at a time from a
    buffer of about ``chunk_bytes``: no more than the imports, and 7x faster.
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False
        mark, mark_line = 0, 1  # newlines are counted up to buf[mark], which is on line mark_line

        def line() -> int:
            nonlocal mark, mark_line
            mark_line += buf.count("\n", mark, pos)
            mark = pos
            return mark_line

        def fill() -> bool:
            """Append the next chunk, dropping what was consumed; False at the end of the file."""
            nonlocal buf, pos, mark, eof
            if eof:
                return False
            raw = f.read(chunk_bytes)
            eof = not raw
            here = line()
            try:
                text = utf8.decode(raw, final=eof)
            except UnicodeDecodeError as err:
                bad = here + buf.count("\n", pos) + raw.count(b"\n", 0, max(0, err.start))
                raise RecordError(f"{path}:{bad}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                                  "re-encode the file as UTF-8") from None
            buf, pos, mark = buf[pos:] + text, 0, 0
            return True

        def skip_space() -> str:
            """The next non-blank character ('' at the end of the file)."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not fill():
                    return ""

        if skip_space() != "[":
            raise RecordError(f"{path}:{line()}: expected a JSON array of objects")
        pos += 1
        index = 0
        while True:
            c = skip_space()
            if c == "]":
                pos += 1
                if skip_space():
                    raise RecordError(f"{path}:{line()}: text after the end of the JSON array")
                return
            if index:
                if c != ",":
                    raise RecordError(f"{path}:{line()}: expected ',' or ']' after element {index - 1}")
                pos += 1
                c = skip_space()
            if not c:
                raise RecordError(f"{path}:{line()}: the JSON array is not closed (file cut short?)")
            start_line = line()
            while True:
                try:
                    record, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as err:
                    # err.lineno counts from buf[0]; buf[pos] is on start_line.
                    bad = start_line + err.lineno - 1 - buf.count("\n", 0, pos)
                    if not fill():  # not cut by the buffer's end: the element itself is malformed
                        raise RecordError(f"{path}:{bad}: element {index}: not valid JSON: {err.msg}") from None
            if not isinstance(record, dict):
                raise RecordError(f"{path}:{start_line}: element {index}: expected a JSON object, "
                                  f"got {type(record).__name__}")
            pos = end
            yield index, start_line, record
            index += 1


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b" \t\r\n").removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n")
    return head.startswith(b"[")


def read_json_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` of a JSON Lines file or a JSON array file, whatever its suffix."""
    path = Path(path)
    if _starts_with_array(path):
        for index, lineno, record in read_json_array(path):
            yield f"{path}:{lineno} (element {index})", record
    else:
        for lineno, record in read_jsonl(path):
            yield f"{path}:{lineno}", record


def file_of(where: str) -> str:
    """The file (or Hub dataset) part of a record's ``where``."""
    return re.sub(r"(:\d+( \(element \d+\))?|:? row \d+)$", "", where)


def parquet_columns(path: str | Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError without the file's name
        raise SourceError(f"{path}: not a readable Parquet file: {err}") from None


def read_parquet(path: str | Path, columns: Iterable[str] | None = None,
                 batch_rows: int = 1024) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of a Parquet file, one record batch in memory at a time, only ``columns``."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise SourceError(f"{path}: not a readable Parquet file: {err}") from None
    names = pf.schema_arrow.names
    cols = None if columns is None else [c for c in columns if c in names]
    i = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        for row in batch.to_pylist():
            yield f"{path}: row {i}", row
            i += 1


def read_records(path: str | Path, columns: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` of one data file, by its suffix (``.jsonl``, ``.json``, ``.parquet``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(path, columns)
    if suffix in (".json", ".jsonl"):
        return read_json_records(path)
    raise SourceError(f"{path}: cannot read {suffix or 'suffix-less'} files; data files must be "
                      f"{', '.join(FILE_SUFFIXES)}")


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line, atomically (:func:`danube.files.atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)


# -- what a format reads ----------------------------------------------------------------------
@dataclass(frozen=True)
class Schema:
    """The columns one record format reads: name -> the type it expects, in words."""

    dataset: str
    required: dict[str, str]
    optional: dict[str, str] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return [*self.required, *self.optional]

    def describe(self) -> str:
        """``"X rows need a (type), b (type); optional: c (type)"``: the schema, for error messages."""
        text = f"{self.dataset} rows need " + ", ".join(f"{c} ({t})" for c, t in self.required.items())
        if self.optional:
            text += "; optional: " + ", ".join(f"{c} ({t})" for c, t in self.optional.items())
        return text

    def check(self, columns: Iterable[str], where: str) -> None:
        """Raise a :class:`SourceError` naming ``where`` when a required column is missing."""
        columns = list(columns)
        missing = [c for c in self.required if c not in columns]
        if missing:
            raise SourceError(f"{where}: no column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                              f"{self.describe()} (columns there: {', '.join(columns) or 'none'})")

    def require(self, record: dict, where: str) -> None:
        """The same check for one JSON record (its keys are its columns)."""
        missing = [c for c in self.required if c not in record]
        if missing:
            raise RecordError(f"{where}: missing {missing}; {self.describe()} (has {sorted(record)[:12]})")


def require(record: dict, keys: tuple[str, ...], where: str, kind: str) -> None:
    """Raise a :class:`RecordError` naming ``where`` when ``record`` lacks a key."""
    missing = [k for k in keys if k not in record]
    if missing:
        raise RecordError(f"{where}: a {kind} record needs {list(keys)}; missing {missing} (has {sorted(record)[:8]})")


def text_field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


# -- sources ----------------------------------------------------------------------------------
@dataclass
class ReadStats:
    """What reading one source gave: rows read, items (conversations, pairs) kept, dropped by reason."""

    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    where: str = ""  # Rows.describe(): the split and files read

    def summary(self, item: str) -> str:
        dropped = ", ".join(f"{n:,} {why}" for why, n in sorted(self.dropped.items()))
        return (f"{self.rows:,} rows from {self.where} -> {self.kept:,} {item}"
                + (f" ({sum(self.dropped.values()):,} dropped: {dropped})" if dropped else ""))


@dataclass(frozen=True)
class Source:
    """Where one source's records are: ``path`` (a file or a dataset directory) or ``hub``.

    ``path`` wins when both are set: it is then a local copy of the ``hub`` dataset.
    ``split`` names the split of a directory or Hub dataset (default ``train``); a single
    file has no splits and ignores it.
    """

    name: str = ""  # the chat_data.sources key; "" outside a config
    path: str | None = None
    hub: str | None = None
    split: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if not self.path and not self.hub:
            raise SourceError(f"{self.label}: give path=FILE|DIR (a local copy) or hub=OWNER/NAME")
        if not self.path and self.hub.count("/") != 1:
            raise SourceError(f"{self.label}: hub={self.hub!r} is not a Hub dataset id OWNER/NAME")

    @property
    def label(self) -> str:
        return f"chat_data.sources.{self.name}" if self.name else str(self.path or f"hub:{self.hub}")

    def with_split(self, split: str) -> "Source":
        return Source(self.name, self.path, self.hub, split, self.revision)


def _hub_offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


class Rows:
    """The records of one source in ``schema``'s columns: resolved at once, read lazily.

    Construction checks what is cheap to check (the file or directory exists, the split
    is there, Parquet and Hub columns); iterating yields ``(where, record)``. ``split``,
    ``files`` and ``count`` say what was read.
    """

    def __init__(self, source: Source, schema: Schema) -> None:
        self.source, self.schema, self.count = source, schema, 0
        self.split: str | None = None
        self.files: list[str] = []
        self._builder = None
        if source.path:
            path = Path(source.path)
            if path.is_file():
                self.kind, self.files = "file", [str(path)]
                if path.suffix.lower() not in FILE_SUFFIXES:
                    raise SourceError(f"{source.label}.path={path}: cannot read {path.suffix or 'suffix-less'} files; "
                                      f"give a {', '.join(FILE_SUFFIXES)} file or a dataset directory")
            elif path.is_dir():
                self.kind, self.split = "dir", source.split or "train"
                self.files = self._directory_files(path)
            else:
                raise FileNotFoundError(f"{source.label}.path={path}: no such file or directory")
        else:
            self.kind, self.split = "hub", source.split or "train"
            self._hub_split_check()
        self._check_columns()

    # -- resolution
    def _splits_error(self, what: str, splits: Iterable[str]) -> SourceError:
        return SourceError(f"{self.source.label}: {what} has no split {self.split!r}; splits found: "
                           f"{', '.join(sorted(splits)) or 'none'} (set {self.source.label}.split)")

    def _directory_files(self, path: Path) -> list[str]:
        import datasets

        try:
            builder = datasets.load_dataset_builder(str(path))
        except (datasets.exceptions.DataFilesNotFoundError, datasets.exceptions.EmptyDatasetError,
                FileNotFoundError) as err:
            raise SourceError(f"{self.source.label}.path={path}: no data files that datasets recognises "
                              f"({type(err).__name__}: {err})") from None
        splits = {str(k): [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
        if self.split not in splits:
            raise self._splits_error(f"the dataset directory {path}", splits)
        return splits[self.split]

    def _hub_split_check(self) -> None:
        import datasets

        hub, revision = self.source.hub, self.source.revision
        try:
            builder = datasets.load_dataset_builder(hub, revision=revision)
        except ConnectionError as err:
            raise SourceError(
                f"{self.source.label}: hub={hub} is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
                f"and the Hub cannot be reached ({err}); load it once online, or set {self.source.label}.path "
                "to a local copy") from None
        except datasets.exceptions.DatasetNotFoundError as err:
            raise SourceError(f"{self.source.label}: hub={hub}: {err}") from None
        splits = list(builder.info.splits or {}) or list(builder.config.data_files or {})
        if self.split not in splits:
            raise self._splits_error(f"the Hub dataset {hub}", splits)
        if revision and _hub_offline():
            log.warning("%s: offline, datasets reads the latest cached copy of %s; revision %s is not checked",
                        self.source.label, hub, revision)
        self._builder = builder

    def _check_columns(self) -> None:
        if self.kind == "hub":
            features = self._builder.info.features
            if features is not None:
                self.schema.check(features, f"{self.source.label} ({self.source.hub}[{self.split}])")
            return
        for f in self.files:
            if f.lower().endswith(".parquet"):
                self.schema.check(parquet_columns(f), f"{self.source.label}: {f}")

    # -- reading
    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        self.count = 0
        if self.kind == "hub":
            records = self._hub_records()
        else:
            records = (r for f in self.files for r in read_records(f, self.schema.columns))
        for where, record in records:
            self.count += 1
            yield where, record

    def _hub_records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        import datasets

        hub, split = self.source.hub, self.split
        ds = datasets.load_dataset(hub, split=split, revision=self.source.revision)
        self.files = [c["filename"] for c in ds.cache_files]
        self.schema.check(ds.column_names, f"{self.source.label} ({hub}[{split}])")
        ds = ds.select_columns([c for c in self.schema.columns if c in ds.column_names])
        i = 0
        for batch in ds.iter(batch_size=1024):
            for values in zip(*batch.values()):
                yield f"{hub}[{split}] row {i}", dict(zip(batch, values))
                i += 1

    def describe(self) -> str:
        """Where the records were read from, for the log."""
        if self.kind == "file":
            return self.files[0]
        names = [Path(f).name for f in self.files]
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} files)" if len(names) > 3 else "")
        where = self.source.path if self.kind == "dir" else f"{self.source.hub}" + (
            f"@{self.source.revision}" if self.source.revision else "")
        return f"{where} split {self.split} ({shown or 'no files'})"


def as_source(source: "Source | str | Path") -> Source:
    """A :class:`Source` for a bare path (a file or dataset directory)."""
    return source if isinstance(source, Source) else Source(path=str(source))
