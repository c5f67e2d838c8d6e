"""Pretraining data: token blocks streamed from prepared directories, optionally as a weighted mixture.

Each source is a directory made by ``danube prepare`` (``train/``, ``val/``, ``manifest.json``).
Blocks of ``seq_len + 1`` tokens are read with litdata's ``TokensLoader``; a batch is
``{"tokens": LongTensor[B, seq_len + 1], "source": LongTensor[B]}`` where ``source``
indexes :attr:`PretrainDataModule.source_names`.

Distributed training: litdata's ``StreamingDataset`` reads the rank and world size from
``torch.distributed`` when it is constructed, so the datasets are built in :meth:`setup`
(which Lightning calls after the process group exists); each rank then streams a disjoint
share of the chunks, and ``drop_last`` is switched on so that every rank gets as many blocks.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch

from danube.data.prepare import check_tokenizer, read_manifest

log = logging.getLogger(__name__)


class _Tag:
    """litdata transform: a block of token ids -> ``{"tokens": int64 tensor, "source": index}``."""

    def __init__(self, source: int) -> None:
        self.source = source

    def __call__(self, block: Any) -> dict[str, Any]:
        return {"tokens": torch.from_numpy(np.asarray(block, dtype=np.int64)), "source": self.source}


def _loader_class():
    from litdata import StreamingDataLoader

    class _ResumableLoader(StreamingDataLoader):
        """A StreamingDataLoader that has a length for mixtures and loads a state idempotently.

        - Lightning prefetches one batch ahead from loaders without a length, so the state it
          checkpoints would be one batch past the last trained one. A weighted mixture has no
          exact length (it stops when the first source runs out), so report the expected one:
          stopping earlier than that is handled by Lightning as the end of the epoch.
        - Both the datamodule and Lightning's fit loop restore the same state; litdata's
          ``load_state_dict`` advances a shared worker cycle each time, so start it afresh.
        - Only full batches are yielded.
        """

        def __init__(self, *args, expected_len: int | None = None, **kwargs) -> None:
            self._expected_len = expected_len
            super().__init__(*args, **kwargs)

        def __len__(self) -> int:
            if self._expected_len is not None:
                return self._expected_len
            return super().__len__()

        def __iter__(self) -> Iterator[Any]:
            # litdata ignores drop_last for the DataLoader itself: a worker's last short batch
            # would change the batch shape (a recompile, wrong token accounting). Drop it.
            for batch in super().__iter__():
                if len(batch["source"]) == self.batch_size:
                    yield batch

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            self._worker_idx = None
            super().load_state_dict(obj)

    return _ResumableLoader


class _Limited:
    """At most ``n`` batches of a loader (validation)."""

    def __init__(self, loader: Any, n: int | None) -> None:
        self.loader, self.n = loader, n

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if self.n is not None and i >= self.n:
                return
            yield batch

    def __len__(self) -> int:
        n = len(self.loader)
        return n if self.n is None else min(n, self.n)


def _source_dict(sources: dict[str, str] | list[str] | str) -> dict[str, Path]:
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if isinstance(sources, dict) or hasattr(sources, "items"):
        named = {str(k): Path(v) for k, v in sources.items()}
    else:
        named = {}
        for d in map(Path, sources):
            name = d.name or str(d)
            named[name if name not in named else f"{name}_{len(named)}"] = d
    if not named:
        raise ValueError("no data sources given")
    return named


def _blocks(split_dir: Path, block_size: int) -> int:
    """How many blocks of ``block_size`` tokens litdata can read from a split (blocks never span chunks)."""
    index = split_dir / "index.json"
    if not index.is_file():
        return 0
    chunks = json.loads(index.read_text())["chunks"]
    return sum(int(c["dim"]) // block_size for c in chunks)


class PretrainDataModule(L.LightningDataModule):
    """Streams ``seq_len + 1``-token blocks from one or more prepared directories.

    Args:
        sources: A prepared directory, a list of them, or ``{name: directory}``.
        seq_len: Tokens per training sequence (blocks hold ``seq_len + 1`` for the shifted targets).
        micro_batch_size: Sequences per batch and device.
        weights: Mixture weights per source name (normalised); default: proportional to the
            training tokens in each manifest.
        seed: Seed of litdata's chunk/block shuffling and of the mixture sampler.
        num_workers: DataLoader worker processes.
        shuffle: Shuffle training blocks (validation is never shuffled).
        tokenizer_checksum: sha256 of the model's tokenizer; sources made with another are refused.
        val_batches: Validation batches per evaluation (None: all of the val splits).
    """

    def __init__(
        self,
        sources: dict[str, str] | list[str] | str,
        seq_len: int,
        micro_batch_size: int,
        weights: dict[str, float] | None = None,
        seed: int = 42,
        num_workers: int = 1,
        shuffle: bool = True,
        tokenizer_checksum: str | None = None,
        val_batches: int | None = 50,
    ) -> None:
        super().__init__()
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be positive, got {seq_len} and {micro_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.sources = _source_dict(sources)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.tokenizer_checksum = tokenizer_checksum
        self.val_batches = val_batches
        if weights is not None:
            unknown = set(weights) - set(self.sources)
            missing = set(self.sources) - set(weights)
            if unknown or missing:
                raise ValueError(f"mixture weights must name exactly the sources {sorted(self.sources)}; "
                                 f"unknown: {sorted(unknown)}, missing: {sorted(missing)}")
            if any(not (w >= 0) for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        self._weights_arg = weights
        self.weights: dict[str, float] | None = None
        self.manifests: dict[str, dict] = {}
        self._train = None
        self._val = None
        self._train_loader = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def source_names(self) -> list[str]:
        return list(self.sources)

    @property
    def tokens_per_batch(self) -> int:
        return self.micro_batch_size * self.seq_len

    # ---- setup

    def _validate(self) -> None:
        """Fail before any compute: missing directories, bad manifests, another tokenizer, too little data."""
        block = self.seq_len + 1
        checksums = {}
        for name, directory in self.sources.items():
            if not directory.is_dir():
                raise FileNotFoundError(f"data source {name!r}: directory not found: {directory}")
            manifest = read_manifest(directory)
            if self.tokenizer_checksum is not None:
                check_tokenizer(directory, self.tokenizer_checksum)
            checksums[name] = manifest["tokenizer"]["checksum"]
            if _blocks(directory / "train", block) < 1:
                raise ValueError(
                    f"data source {name!r} ({directory}): fewer than {block} training tokens in any shard "
                    f"({manifest['totals']['train']['tokens']} in all); prepare more data or lower seq_len"
                )
            self.manifests[name] = manifest
        if len(set(checksums.values())) > 1:
            raise ValueError(f"data sources were tokenized with different tokenizers: {checksums}")
        tokens = {n: m["totals"]["train"]["tokens"] for n, m in self.manifests.items()}
        raw = self._weights_arg or tokens
        total = sum(raw.values())
        self.weights = {n: raw[n] / total for n in self.sources}

    def setup(self, stage: str | None = None) -> None:
        if not self.manifests:
            self._validate()
        if stage in (None, "fit") and self._train is None:
            self._train = self._dataset("train", shuffle=self.shuffle)
        if stage in (None, "fit", "validate") and self._val is None:
            self._val = self._dataset("val", shuffle=False)

    def _dataset(self, split: str, shuffle: bool):
        from litdata import CombinedStreamingDataset, StreamingDataset
        from litdata.streaming.item_loader import TokensLoader

        block = self.seq_len + 1
        streams, weights = [], []
        for i, (name, directory) in enumerate(self.sources.items()):
            if _blocks(directory / split, block) < 1:
                if split == "train":  # _validate guarantees this does not happen
                    raise ValueError(f"{directory / split}: no {block}-token block")
                log.info("data source %r has no %s block of %d tokens; it is left out of %s", name, split, block, split)
                continue
            streams.append(StreamingDataset(
                str(directory / split), item_loader=TokensLoader(block_size=block), shuffle=shuffle,
                seed=self.seed, transform=_Tag(i),
            ))
            weights.append(self.weights[name])
        if not streams:
            return None
        if len(streams) == 1:
            return streams[0]
        if split == "train":
            # Weighted sampling; the epoch ends when the first source runs out.
            return CombinedStreamingDataset(streams, seed=self.seed, weights=weights, iterate_over_all=False)
        return CombinedStreamingDataset(streams, seed=self.seed, iterate_over_all=True)

    # ---- loaders

    def _expected_batches(self, dataset) -> int | None:
        """Batches per epoch of a weighted mixture: until the first source is expected to run out."""
        from litdata import CombinedStreamingDataset

        if not isinstance(dataset, CombinedStreamingDataset):
            return None
        workers = max(self.num_workers, 1)
        lens = [d.get_len(self.num_workers, self.micro_batch_size) for d in dataset._datasets]
        weights = dataset._weights
        samples = min(n / w for n, w in zip(lens, weights) if w > 0)
        # Each worker draws from its own share of every source.
        return max(1, int(samples) // (self.micro_batch_size * workers) * workers)

    def train_dataloader(self):
        if self._train is None:
            self.setup("fit")
        loader_cls = _loader_class()
        self._train_loader = loader_cls(
            self._train, batch_size=self.micro_batch_size, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), drop_last=True,
            expected_len=self._expected_batches(self._train),
        )
        if self._pending_state:
            self._train_loader.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._train_loader

    def val_dataloader(self):
        if self._val is None:
            self.setup("validate")
        if self._val is None:
            log.warning("no validation data: the val/ splits of %s hold no %d-token block",
                        [str(d) for d in self.sources.values()], self.seq_len + 1)
            return []
        from litdata import StreamingDataLoader

        loader = StreamingDataLoader(self._val, batch_size=self.micro_batch_size, num_workers=self.num_workers,
                                     pin_memory=torch.cuda.is_available(), shuffle=False)
        return _Limited(loader, self.val_batches)

    # ---- resume

    def state_dict(self) -> dict[str, Any]:
        """The train loader's position (Lightning stores it in checkpoints)."""
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        if self._pending_state:
            return {"train_loader": self._pending_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at the batch after the one the state was saved at (applied when the loader is built)."""
        state = state_dict.get("train_loader")
        if not state:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._pending_state = state

    def describe(self) -> str:
        """One line per source: directory, weight and training tokens (for the run log)."""
        lines = []
        for name, directory in self.sources.items():
            tokens = self.manifests.get(name, {}).get("totals", {}).get("train", {}).get("tokens", math.nan)
            weight = (self.weights or {}).get(name, math.nan)
            lines.append(f"{name}: {directory} weight {weight:.3f}, {tokens:,} train tokens")
        return "\n".join(lines)
