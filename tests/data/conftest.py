"""Fixtures for the data pipeline tests: small corpora, prepared directories, a token reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import corpus_lines


def make_docs(n: int, offset: int = 0, lines_per_doc: int = 3) -> list[str]:
    """``n`` distinct multi-line documents of pydoc prose."""
    lines = corpus_lines(2000)
    docs = []
    for i in range(n):
        start = (offset + i * lines_per_doc) % (len(lines) - lines_per_doc)
        docs.append(f"[{offset + i}] " + "\n".join(lines[start : start + lines_per_doc]))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def read_stream(split_dir: Path) -> np.ndarray:
    """Every token litdata's StreamingDataset can read from a split, in order (one block per chunk)."""
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    index = json.loads((split_dir / "index.json").read_text())
    dims = {int(c["dim"]) for c in index["chunks"]}
    # A block as long as every chunk makes item i exactly chunk i; otherwise read token by token.
    block = dims.pop() if len(dims) == 1 else 1
    ds = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=block))
    return np.concatenate([np.asarray(ds[i]) for i in range(len(ds))]).astype(np.int64)


def split_docs(stream: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    """Documents of a token stream: each must be [bos] + ids + [eos]."""
    docs, start = [], 0
    for end in np.flatnonzero(stream == eos):
        doc = stream[start : end + 1].tolist()
        assert doc[0] == bos and doc[-1] == eos and bos not in doc[1:], doc[:5]
        docs.append(doc[1:-1])
        start = end + 1
    assert start == len(stream), "token stream does not end with EOS"
    return docs


@pytest.fixture(scope="session")
def two_sources(tmp_path_factory, sp_model) -> dict[str, Path]:
    """Two prepared directories with different documents (a: 400 docs, b: 300 docs)."""
    from danube.corpus.prepare import prepare

    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name, n, offset in (("a", 400, 0), ("b", 300, 5000)):
        src = write_jsonl(root / f"{name}.jsonl", make_docs(n, offset))
        prepare([src], root / name, sp_model, val_fraction=0.1, num_workers=1, chunk_bytes="16KB")
        out[name] = root / name
    return out
