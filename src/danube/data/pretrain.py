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
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch

from danube.data.prepare import check_tokenizer, read_manifest
from danube.schedule import check_mixture

log = logging.getLogger(__name__)


def _worker_init(worker_id: int) -> None:
    """Loader workers leave SIGTERM and SIGINT to the training process.

    A scheduler that signals the whole process group (SLURM, a terminal's Ctrl-C) would
    otherwise kill the workers first, and the training process would die of "DataLoader
    worker killed" instead of stopping at its next optimizer step with a checkpoint. A
    worker still exits when the training process does.
    """
    import signal

    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Tag:
    """litdata transform: a block of token ids -> ``{"tokens": int64 tensor, "source": index}``."""

    def __init__(self, source: int) -> None:
        self.source = source

    def __call__(self, block: Any) -> dict[str, Any]:
        return {"tokens": torch.from_numpy(np.asarray(block, dtype=np.int64)), "source": self.source}


def _loader_class():
    from litdata import StreamingDataLoader

    class _ResumableLoader(StreamingDataLoader):
        """A StreamingDataLoader that yields only full batches and loads a state idempotently.

        Both the datamodule and Lightning's fit loop restore the same state; litdata's
        ``load_state_dict`` advances a shared worker cycle each time, so start it afresh.
        """

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


class _Mixture:
    """A weighted mixture of per-source loaders (one block per step each) batched here.

    litdata's ``CombinedStreamingDataset`` resumes a mixture exactly only with at most one
    worker: its state sums the samples each worker drew per source, and the per-worker split
    it then assumes is wrong when a worker drew unevenly. Here every source has its own
    ``StreamingDataLoader`` (exactly resumable) and the source of sample ``k`` is a pure
    function of ``(seed, epoch, k)``, so the mixture resumes exactly with any worker count.
    Every rank draws the same source sequence; with litdata's equal per-rank shares the
    ranks therefore end the epoch (the first source running out) at the same step.

    The sources follow a Weyl sequence rather than independent draws: sample ``k`` takes
    the source whose cumulative-weight interval holds ``frac(u0 + k * 0.618...)``, ``u0``
    drawn from ``(seed, epoch)``. Any run of ``n`` samples then holds each source ``n * w``
    times give or take a few samples (independent draws: give or take ``sqrt(n w (1 - w))``),
    so even a short stage gets the mixture it asked for.
    """

    _BLOCK = 4096
    _GOLDEN = (5**0.5 - 1) / 2  # the irrational step with the most even coverage of [0, 1)

    def __init__(self, loaders: list, source_ids: list[int], weights: list[float], batch_size: int, seed: int) -> None:
        self.loaders, self.source_ids, self.batch_size, self.seed = loaders, source_ids, batch_size, seed
        self.p = np.asarray(weights, dtype=np.float64) / sum(weights)
        self._edges = np.cumsum(self.p)[:-1]  # interval i is [edges[i-1], edges[i])
        self.epoch = 0
        self.samples = 0  # drawn in the current epoch
        self._restored = False
        self._choices: tuple[int, np.ndarray] | None = None

    def _choice(self, k: int) -> int:
        block = k // self._BLOCK
        if self._choices is None or self._choices[0] != block:
            u0 = np.random.default_rng([self.seed, self.epoch]).random()
            u = np.mod(u0 + (block * self._BLOCK + np.arange(self._BLOCK)) * self._GOLDEN, 1.0)
            # side="right": a zero-weight source (an empty interval) is never chosen.
            self._choices = (block, np.searchsorted(self._edges, u, side="right"))
        return int(self._choices[1][k % self._BLOCK])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self._restored:
            self.epoch += 1
            self.samples = 0
        self._restored = False
        self._choices = None
        iters = [iter(loader) for loader in self.loaders]
        while True:
            picks = [self._choice(self.samples + j) for j in range(self.batch_size)]
            blocks = []
            for i in picks:
                try:
                    blocks.append(next(iters[i]))
                except StopIteration:
                    return  # the first source to run out ends the epoch
            self.samples += self.batch_size
            yield {
                "tokens": torch.cat([b["tokens"] for b in blocks]),
                "source": torch.tensor([self.source_ids[i] for i in picks], dtype=torch.long),
            }

    def __len__(self) -> int:
        """Expected batches per epoch: until the first source is expected to run out.

        Lightning prefetches a batch from loaders without a length, so the state it saves
        would be a batch ahead; with a length it does not. Ending earlier is just the end
        of the epoch to Lightning.
        """
        lens = [len(loader) for loader in self.loaders]
        return max(1, int(min(n / p for n, p in zip(lens, self.p) if p > 0)) // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples": self.samples, "loaders": [lo.state_dict() for lo in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["loaders"]) != len(self.loaders):
            raise ValueError(f"the saved data state has {len(state['loaders'])} sources, this run has "
                             f"{len(self.loaders)}; resume with the same data sources")
        for loader, s in zip(self.loaders, state["loaders"]):
            loader.load_state_dict(s)
        self.epoch, self.samples = state["epoch"], state["samples"]
        self._restored = True


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


def named_sources(sources: dict[str, str] | list[str] | str) -> dict[str, Path]:
    """``{name: directory}`` of the sources: as given, or a directory (or a list) named after its last component."""
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
        num_workers: DataLoader worker processes for a single source and for validation (a
            mixture reads its blocks in the training process, which measured faster).
        shuffle: Shuffle training blocks (validation is never shuffled).
        tokenizer_checksum: sha256 of the model's tokenizer; sources made with another are refused.
        val_batches: Validation batches per evaluation (None: all of the val splits).
        world_size: Devices the batches are shared over: every one needs a full micro-batch.
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
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be positive, got {seq_len} and {micro_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.sources = named_sources(sources)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.tokenizer_checksum = tokenizer_checksum
        self.val_batches = val_batches
        self.world_size = world_size
        if weights is not None:
            check_mixture(weights, list(self.sources), "mixture weights")
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
        if len(self.sources) == 1:
            # One source is read in micro-batches by every rank: fewer blocks than that is no training at all.
            (name, directory), = self.sources.items()
            need = self.micro_batch_size * self.world_size
            have = _blocks(directory / "train", block)
            if have < need:
                raise ValueError(
                    f"data source {name!r} ({directory}) holds {have} training blocks of {block} tokens, fewer than "
                    f"one micro-batch of {self.micro_batch_size} on each of {self.world_size} device(s) ({need}); "
                    "prepare more data, or lower train.micro_batch_tokens or seq_len"
                )
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
        streams, ids, weights = [], [], []
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
            ids.append(i)
            weights.append(self.weights[name])
        if not streams:
            return None
        if split == "train":
            return streams, ids, weights  # mixed in _Mixture (exact resume with any worker count)
        if len(streams) == 1:
            return streams[0]
        return CombinedStreamingDataset(streams, seed=self.seed, iterate_over_all=True)

    # ---- loaders

    def train_dataloader(self):
        if self._train is None:
            self.setup("fit")
        loader_cls = _loader_class()
        streams, ids, weights = self._train
        pin = torch.cuda.is_available()
        if len(streams) == 1:
            self._train_loader = loader_cls(streams[0], batch_size=self.micro_batch_size, num_workers=self.num_workers,
                                            pin_memory=pin, drop_last=True,
                                            worker_init_fn=_worker_init if self.num_workers else None)
        else:
            # Each source's blocks are read in this process: a mixture draws one block at a time
            # from each source, and handing single blocks over a worker queue capped it at ~2.6M
            # tokens/s against ~78M in-process (bench/data_loading.py, BENCHMARKS.md). litdata
            # still fetches chunks in its own background thread.
            if self.num_workers:
                log.info("mixture of %d sources: blocks are read in the training process (num_workers=%d unused)",
                         len(streams), self.num_workers)
            loaders = [loader_cls(s, batch_size=1, num_workers=0, pin_memory=pin) for s in streams]
            self._train_loader = _Mixture(loaders, ids, weights, self.micro_batch_size, self.seed)
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
                                     pin_memory=torch.cuda.is_available(), shuffle=False,
                                     worker_init_fn=_worker_init if self.num_workers else None)
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

