"""A prepared split as one token stream, read by position straight out of its shard files.

``danube prepare`` writes each split with litdata's ``BinaryWriter`` and ``TokensLoader``:
``index.json`` lists the chunk files in order, and each chunk holds a header (the number
of items, then each item's byte offset) followed by the items' tokens back to back. The
split's *stream* is its chunks' tokens concatenated: token ``i`` of the stream is the same
token whatever reads it. :class:`danube.data.order.Walk` decides which ranges of the
stream a run reads; this module only reads them, memory-mapped (nothing is loaded that is
not read, and the page cache is shared by every process of the machine).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

INDEX = "index.json"


class TokenStream:
    """The tokens of one split (``train/`` or ``val/`` of a prepared directory), addressable by position."""

    def __init__(self, split_dir: str | Path, dtype: str) -> None:
        self.dir = Path(split_dir)
        self.dtype = np.dtype(dtype)
        index = self.dir / INDEX
        try:
            chunks = json.loads(index.read_text())["chunks"]
        except FileNotFoundError:
            chunks = []
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a litdata index ({err})") from err
        self._files = [self.dir / c["filename"] for c in chunks]
        sizes = np.array([int(c["dim"]) for c in chunks], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.tokens = int(self.starts[-1])
        # What the recorded positions of a run mean: the chunk files and their lengths.
        self.fingerprint = hashlib.sha256(
            json.dumps([[c["filename"], int(c["dim"])] for c in chunks]).encode()).hexdigest()[:16]
        self._maps: list[np.ndarray | None] = [None] * len(chunks)

    def _chunk(self, i: int) -> np.ndarray:
        data = self._maps[i]
        if data is None:
            path = self._files[i]
            raw = np.memmap(path, dtype=np.uint8, mode="r")
            n_items = int(raw[:4].view(np.uint32)[0])
            offsets = raw[4: 4 + 4 * (n_items + 1)].view(np.uint32)
            begin, end = int(offsets[0]), int(offsets[-1])
            want = int(self.starts[i + 1] - self.starts[i]) * self.dtype.itemsize
            if end - begin != want or end > raw.size:
                raise ValueError(f"{path}: holds {(end - begin) // self.dtype.itemsize} tokens where {self.dir / INDEX} "
                                 f"says {want // self.dtype.itemsize}; the shard is damaged or from another dataset")
            data = self._maps[i] = raw[begin:end].view(self.dtype)
        return data

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream (into ``out`` when given), as int64."""
        if start < 0 or start + length > self.tokens:
            raise IndexError(f"{self.dir}: tokens [{start}, {start + length}) outside its {self.tokens}")
        if out is None:
            out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            chunk = self._chunk(i)
            at = start + done - int(self.starts[i])
            take = min(length - done, chunk.size - at)
            out[done: done + take] = chunk[at: at + take]
            done += take
            i += 1
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._files)  # a DataLoader worker maps the files itself
        return state
