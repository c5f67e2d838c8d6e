"""What both trained quality classifiers share: labelled data, metrics, the directory format.

A classifier directory holds ``quality_classifier.json`` (format, kind, what it was trained
on, its held-out metrics) beside the kind's own files;
:func:`danube.data.quality.filter.load_scorer` reads the json and returns the right
scorer, and a directory of another kind, or none, is a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from danube.data.records import read_jsonl, require, text_field

META_FILE = "quality_classifier.json"
FORMAT = "danube-quality-classifier/1"
KINDS = ("gbm", "transformer")


class Scorer(Protocol):
    """A trained classifier: ``score(texts)`` is the probability that each text is good."""

    kind: str
    path: Path

    def score(self, texts: list[str]) -> np.ndarray: ...


def read_texts(files: list[str | Path], field: str) -> list[str]:
    """Every record's ``field`` of the ``.jsonl`` files; a bad record names its file and line."""
    texts = []
    for file in files:
        for lineno, record in read_jsonl(file):
            require(record, (field,), f"{file}:{lineno}", "document")
            texts.append(text_field(record, field, f"{file}:{lineno}"))
    return texts


def labelled(positive: list[str | Path], negative: list[str | Path], field: str) -> tuple[list[str], np.ndarray]:
    """Texts of both sets and their labels (1 good, 0 bad); both sets must be non-empty."""
    pos, neg = read_texts(positive, field), read_texts(negative, field)
    for name, texts, files in (("positive", pos, positive), ("negative", neg, negative)):
        if not texts:
            raise ValueError(f"no {name} examples in {[str(f) for f in files]}")
    return pos + neg, np.array([1] * len(pos) + [0] * len(neg), dtype=np.int64)


def split(n: int, labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) index arrays; ``val_fraction=0`` keeps everything for training."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == label))
        k = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and (k == 0 or k == len(idx)):
            raise ValueError(f"val_fraction={val_fraction} leaves no {'validation' if k == 0 else 'training'} "
                             f"examples of label {label} ({len(idx)} in all)")
        val.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), np.sort(np.concatenate(val))


def metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy at ``threshold`` and ROC AUC (when both labels are present)."""
    from sklearn.metrics import roc_auc_score

    out = {"examples": int(len(labels)), "accuracy": float(np.mean((scores >= threshold) == (labels == 1)))}
    if len(set(labels.tolist())) == 2:
        out["auc"] = float(roc_auc_score(labels, scores))
    return out


def read_meta(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The metadata of a classifier directory; ``kind`` set: refuse a directory of another kind."""
    path = Path(path)
    file = path / META_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"quality classifier not found: {path} (a directory written by "
                                "`danube quality train-gbm` or `train-transformer`)")
    if not file.is_file():
        raise ValueError(f"{path} is not a danube quality classifier: no {META_FILE}")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise ValueError(f"{file}: not a danube quality classifier (expected format {FORMAT!r}, kind one of {KINDS})")
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{path} is a {meta['kind']} quality classifier, not a {kind} one "
                         f"(pass it with --{meta['kind']})")
    return meta


def write_dir(path: str | Path, meta: dict[str, Any], write_files: Callable[[Path], None]) -> Path:
    """Write a classifier directory atomically: ``write_files(tmp)`` then the metadata, then rename."""
    from danube.files import atomic_dir

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / META_FILE).is_file():
        raise FileExistsError(f"{path} is a non-empty directory that is not a quality classifier; "
                              "refusing to replace it")
    with atomic_dir(path) as tmp:
        write_files(tmp)
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")
    return path

