"""JSON Lines records with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from danube.files import atomic_file


class RecordError(ValueError):
    """A malformed record: the message starts with ``FILE:LINE:``."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}:{lineno}: not valid JSON: {err}") from err
            if not isinstance(record, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line, atomically (:func:`danube.files.atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)


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
