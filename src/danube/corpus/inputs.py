"""Corpus inputs as corpora ship: local files, directories, globs and fsspec URLs, read strictly.

Formats: ``.txt`` (documents separated by blank lines), ``.jsonl`` and ``.jsonl.gz`` /
``.jsonl.zst`` (one JSON object per line), ``.parquet``. Paths may be local (files,
directories searched recursively, globs) or fsspec URLs (``s3://bucket/dir/*.jsonl.zst``,
``hf://datasets/ORG/NAME/data/*.parquet``, ``file://``).

The work is cut into :class:`Unit` s: byte ranges of a plain ``.txt`` / ``.jsonl`` file (cut
after a record separator, so each holds whole records), a whole compressed file (a
compressed stream cannot be entered in the middle), or a run of parquet row groups. Reading a
unit streams it: memory stays bounded by the unit, never the file.

Every record that cannot be read is named ``FILE:LINE: what is wrong`` (``FILE: row N:``
for parquet): a caller either stops there or skips and counts it.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
COMPRESSION = {".jsonl.gz": "gzip", ".jsonl.zst": "zstd"}
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
_GLOB = re.compile(r"[*?\[]")


class BadRecord(ValueError):
    """A record that cannot be read; the message starts with ``FILE:LINE:`` or ``FILE: row N:``."""


def suffix(name: str) -> str | None:
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _filesystem(item: str):
    from fsspec.core import url_to_fs

    return url_to_fs(item)


def _is_url(item: str) -> bool:
    return "://" in item


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_url(item: str) -> str:
    """A Hugging Face Hub dataset id (``ORG/NAME``, not a local path) as its ``hf://datasets/`` URL."""
    if "://" in item or Path(item).exists() or not _HUB_ID.match(item):
        return item
    return f"hf://datasets/{item}"


def list_inputs(inputs: list[str | Path]) -> list[str]:
    """Expand files, directories (recursively), globs, URLs and Hub dataset ids into supported input files.

    ``ORG/NAME`` that is not a local path is the Hub dataset (``hf://datasets/ORG/NAME``: every
    supported file of its main branch, through ``huggingface_hub``'s fsspec filesystem). Order: each input in turn, the files it names sorted; a file named twice is read once.
    Local files come back as plain paths, remote ones as URLs.
    """
    found: list[str] = []
    for raw in map(str, inputs):
        given, raw = raw, hub_url(raw)
        try:
            names, as_name = _names(raw)
        except FileNotFoundError as err:
            if given != raw:  # a bare ORG/NAME
                raise FileNotFoundError(f"{given}: neither a local path nor a Hub dataset found from here "
                                        f"({err}; offline or a private dataset: use a local snapshot directory)") from err
            raise
        except ValueError:
            raise
        except Exception as err:  # a remote filesystem: no network, no access, no such bucket
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            what = f"{given} (as {raw})" if given != raw else raw
            raise FileNotFoundError(f"{what}: cannot be listed ({type(err).__name__}: {first})") from err
        found.extend(as_name(p) for p in names)
    unique, seen = [], set()
    for name in found:
        key = str(Path(name).resolve()) if not _is_url(name) else name
        if key not in seen:
            seen.add(key)
            unique.append(name)
    return unique


def _names(raw: str):
    """The supported files ``raw`` names, and how to turn each back into a path or URL."""
    fs, path = _filesystem(raw)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    as_name = (lambda p: p) if protocol in ("file", "local") else (lambda p: fs.unstrip_protocol(p))
    if _GLOB.search(path):
        names = sorted(p for p in fs.glob(path) if fs.isfile(p) and suffix(p))
        if not names:
            raise FileNotFoundError(f"{raw}: no {', '.join(SUFFIXES)} files match")
    elif fs.isdir(path):
        names = sorted(p for p in fs.find(path) if suffix(p) and not Path(p).name.startswith("."))
        if not names:
            raise FileNotFoundError(f"{raw}: no {', '.join(SUFFIXES)} files in this directory")
    elif fs.isfile(path):
        if not suffix(path):
            raise ValueError(f"{raw}: unsupported input type; expected one of {', '.join(SUFFIXES)}")
        names = [path]
    else:
        raise FileNotFoundError(f"input not found: {raw}")
    return names, as_name


def local_paths(inputs) -> list[str]:
    """The inputs that are not URLs (what an output must not be, or be inside)."""
    return [i for i in map(str, inputs) if not _is_url(i)]


def fingerprint(name: str) -> dict:
    """What identifies an input file's content cheaply: its size and modification time (or etag)."""
    fs, path = _filesystem(name)
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("ETag") or \
        info.get("etag") or info.get("blob_id")
    return {"size": int(info.get("size") or 0), "stamp": str(stamp) if stamp is not None else None}


@dataclass
class Unit:
    """A slice of one input file: a byte range of a plain file, a whole compressed file, or parquet row groups."""

    index: int
    source: int  # index into the list of input files
    path: str
    kind: str
    start: int = 0
    end: int = -1
    row_groups: list[int] = field(default_factory=list)
    first_row: int = 0
    nbytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _split_points(name: str, sep: re.Pattern, unit_bytes: int) -> list[int]:
    """Offsets just after a separator near every multiple of ``unit_bytes``: each range holds whole records."""
    fs, path = _filesystem(name)
    size = fs.size(path)
    points = [0]
    with fs.open(path, "rb") as f:
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


def _parquet_units(name: str, source: int, text_field: str, unit_bytes: int, first_index: int) -> list[Unit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = _filesystem(name)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            meta, schema = pf.metadata, pf.schema_arrow
    except Exception as err:  # pyarrow raises several types for a broken file
        raise ValueError(f"{name}: not a readable parquet file: {err}") from err
    if text_field not in schema.names:
        raise ValueError(f"{name}: no column {text_field!r} (columns: {', '.join(schema.names)}); pass --text-field")
    typ = schema.field(text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise ValueError(f"{name}: column {text_field!r} has type {typ}, expected string")
    units: list[Unit] = []
    groups: list[int] = []
    first_row = row = size = 0
    for g in range(meta.num_row_groups):
        if not groups:
            first_row = row
        groups.append(g)
        size += meta.row_group(g).total_byte_size
        row += meta.row_group(g).num_rows
        if size >= unit_bytes or g == meta.num_row_groups - 1:
            units.append(Unit(first_index + len(units), source, name, ".parquet", row_groups=groups,
                              first_row=first_row, nbytes=size))
            groups, size = [], 0
    return units


def plan_units(files: list[str], text_field: str, unit_bytes: int) -> list[Unit]:
    """Cut ``files`` into units of about ``unit_bytes``, in input order."""
    units: list[Unit] = []
    for source, name in enumerate(files):
        kind = suffix(name)
        if kind in (".txt", ".jsonl"):
            points = _split_points(name, _BLANK_LINE if kind == ".txt" else re.compile(rb"\n"), unit_bytes)
            for start, end in zip(points, points[1:]):
                units.append(Unit(len(units), source, name, kind, start, end, nbytes=end - start))
        elif kind in COMPRESSION:
            fs, path = _filesystem(name)
            units.append(Unit(len(units), source, name, kind, nbytes=fs.size(path)))
        else:
            units.extend(_parquet_units(name, source, text_field, unit_bytes, len(units)))
    return units


def _line_of(name: str, offset: int) -> int:
    """1-based line number of byte ``offset`` (only computed when a line is bad)."""
    fs, path = _filesystem(name)
    with fs.open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


class Read(NamedTuple):
    """One record of an input: its text, or what is wrong with it; the whole record when asked for."""

    text: str | None
    error: str | None = None
    record: dict | None = None


def parse_json_line(line: bytes, text_field: str, where, records: bool = False) -> Read:
    """The text of a good record (``""`` for a blank line), or ``"WHERE: what"`` of a bad one."""
    if not line.strip():
        return Read("", record={text_field: ""} if records else None)  # an empty document: counted, not an error
    try:
        record = json.loads(line)
    except UnicodeDecodeError as err:
        return Read(None, f"{where()}: not valid UTF-8 ({err.reason} at byte {err.start})")
    except json.JSONDecodeError as err:
        return Read(None, f"{where()}: not valid JSON ({err})")
    if not isinstance(record, dict):
        return Read(None, f"{where()}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        return Read(None, f"{where()}: no {text_field!r} field (keys: {', '.join(map(str, list(record)[:10]))})")
    text = record[text_field]
    if not isinstance(text, str):
        return Read(None, f"{where()}: {text_field!r} is {type(text).__name__}, not a string")
    return Read(text, record=record if records else None)


def _compressed_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _decompressed(raw, what: str, name: str):
    """A line-iterable stream of the decompressed bytes of ``raw``, read as it is consumed."""
    import io

    if what == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    try:
        import zstandard
    except ImportError as err:
        raise ImportError(f"{name}: reading .zst needs the zstandard package (pip install zstandard)") from err
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))


def read_unit(unit: Unit, text_field: str, records: bool = False) -> Iterator[Read]:
    """A :class:`Read` per document (with ``records``: the whole record too) or per bad record
    (``"FILE:LINE: what is wrong"``), streaming."""
    fs, path = _filesystem(unit.path)
    if unit.kind == ".parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            row = unit.first_row
            for g in unit.row_groups:
                try:
                    table = pf.read_row_group(g, columns=None if records else [text_field])
                except Exception as err:
                    raise BadRecord(f"{unit.path}: row group {g} (rows from {row}): unreadable: {err}") from err
                rows = table.to_pylist() if records else [None] * table.num_rows
                for text, record in zip(table.column(text_field).to_pylist(), rows):
                    yield Read(None, f"{unit.path}: row {row}: {text_field!r} is null") if text is None \
                        else Read(text, record=record)
                    row += 1
        return
    if unit.kind in COMPRESSION:
        what = COMPRESSION[unit.kind]
        try:
            with fs.open(path, "rb") as raw, _decompressed(raw, what, unit.path) as f:
                for lineno, line in enumerate(f, 1):
                    yield parse_json_line(line, text_field, lambda: f"{unit.path}:{lineno}", records)
        except _compressed_errors() as err:
            raise BadRecord(f"{unit.path}: corrupt {what} file ({err})") from err
        return
    with fs.open(path, "rb") as f:
        f.seek(unit.start)
        data = f.read(unit.end - unit.start)
    if unit.kind == ".jsonl":
        pos = 0
        for line in data.splitlines(keepends=True):
            offset = unit.start + pos
            pos += len(line)
            yield parse_json_line(line, text_field, lambda: f"{unit.path}:{_line_of(unit.path, offset)}", records)
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
            yield Read(None, f"{unit.path}:{_line_of(unit.path, offset)}: not valid UTF-8 ({err.reason} at byte {err.start})")
            continue
        if text.strip():
            doc.append(text)
        elif doc:
            yield _txt_doc(doc, text_field, records)
            doc = []
    if doc:
        yield _txt_doc(doc, text_field, records)


def _txt_doc(lines: list[str], text_field: str, records: bool) -> Read:
    text = "".join(lines).rstrip("\r\n")
    return Read(text, record={text_field: text} if records else None)
