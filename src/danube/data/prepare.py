"""Prepared token shards as training reads them: the manifest and its tokenizer check.

``danube prepare`` (:mod:`danube.corpus.prepare`, a datatrove pipeline) writes a prepared
dataset; training streams it:

    OUT/train/   index.json + chunk-*.bin   (litdata, ``TokensLoader``: [bos] doc [eos] ...)
    OUT/val/     held-out documents
    OUT/manifest.json
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
FORMAT = "danube-token-shards/1"


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
