"""Pretraining data: batches of token blocks along one walk through prepared directories.

Each source is a directory made by ``danube prepare`` (``train/``, ``val/``, ``manifest.json``),
read as one token stream per split (:class:`~danube.data.streams.TokenStream`). Which tokens
every optimizer step reads is the walk of :mod:`danube.data.order`: a function of the seed,
the sources and the position, the same on any number of devices, continued from stage to
stage and across resumes. A batch is ``{"tokens": LongTensor[B, seq_len + 1], "source":
LongTensor[B]}`` where ``source`` indexes :attr:`PretrainDataModule.source_names`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import lightning as L
import numpy as np
import torch

from danube.data.order import FORMAT, Layout, Sample, Walk, digest, micro_batch_indices, plan_layout
from danube.data.prepare import check_tokenizer, read_manifest
from danube.data.streams import TokenStream
from danube.data.workers import worker_init
from danube.files import atomic_write_text
from danube.schedule import check_mixture

log = logging.getLogger(__name__)


class _TrainSteps(torch.utils.data.IterableDataset):
    """One rank's micro-batches of optimizer steps ``[first, last)`` of a stage, read along the walk.

    Every reader (the rank's process, or each of its loader workers) replays the whole
    global batch of each step -- bookkeeping only, ~0.25 ms for 576 samples -- and reads just its
    own micro-batches; worker ``w`` of ``n`` reads this rank's micro-batches ``w, w + n, ...``,
    which the DataLoader hands out in that order.
    """

    def __init__(self, streams: dict[str, TokenStream], walk_args: dict[str, Any], block: int, micro: int,
                 rank: int, world: int, accumulate: int, first: int, last: int) -> None:
        self.streams, self.walk_args = streams, walk_args
        self.block, self.micro, self.first, self.last = block, micro, first, last
        self.mine = micro_batch_indices(rank, world, accumulate)
        self.global_batch = micro * world * accumulate
        self.announce = rank == 0  # rank zero's first reader logs each source's new epochs as it reaches them

    def __len__(self) -> int:
        # Counted from the stage's first step: Lightning's loop, resumed mid-stage, goes on
        # counting micro-batches from the resumed step's, and ends the epoch at this length.
        return self.last * len(self.mine)

    def __iter__(self) -> Iterator[_Rows]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        walk = make_walk(**self.walk_args, announce=self.announce and worker == 0)
        names = walk.names
        local = 0
        for _step in range(self.first, self.last):
            samples = walk.batch(self.global_batch, self.block)
            for m in self.mine:
                if local % workers == worker:
                    yield read_rows_of(self.streams, names, samples[m * self.micro: (m + 1) * self.micro], self.block)
                local += 1


class _Rows:
    """A micro-batch as numpy arrays: a loader worker hands it over through its pipe.

    Two tensors would each travel as a shared-memory file: 1.9 ms per micro-batch of
    8 x 2,049 tokens here against 0.4 ms pickled (``bench/data_loading.py``).
    """

    __slots__ = ("tokens", "source")

    def __init__(self, tokens: np.ndarray, source: np.ndarray) -> None:
        self.tokens, self.source = tokens, source

    def tensors(self, pin: bool = False) -> dict[str, torch.Tensor]:
        batch = {"tokens": torch.from_numpy(self.tokens), "source": torch.from_numpy(self.source)}
        return {k: v.pin_memory() for k, v in batch.items()} if pin else batch


class _Batches:
    """The training loader: the DataLoader's micro-batches as ``{"tokens", "source"}`` tensors."""

    def __init__(self, loader: torch.utils.data.DataLoader, pin: bool) -> None:
        self.loader, self.pin = loader, pin

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows in self.loader:
            yield rows.tensors(self.pin)


def read_rows_of(streams: dict[str, TokenStream], names: list[str], samples: list[Sample | _Block],
                 block: int) -> _Rows:
    """The tokens of ``samples`` (``[n, block]`` int64) and their sources (``[n]``)."""
    tokens = np.empty((len(samples), block), dtype=np.int64)
    for row, sample in zip(tokens, samples):
        stream, at = streams[names[sample.source]], 0
        for start, length in sample.ranges:
            stream.read(start, length, out=row[at: at + length])
            at += length
    return _Rows(tokens, np.array([s.source for s in samples], dtype=np.int64))


def read_samples(streams: dict[str, TokenStream], names: list[str], samples: list[Sample | _Block], block: int) -> dict:
    """The tokens of ``samples`` as ``{"tokens": LongTensor[n, block], "source": LongTensor[n]}``."""
    return read_rows_of(streams, names, samples, block).tensors()


def make_walk(layouts: dict[str, Layout], seed: int, state: dict | None, weights: dict[str, float],
              announce: bool = False) -> Walk:
    walk = Walk(layouts, seed, state, announce=announce)
    walk.set_weights(weights)
    return walk


class _Planner:
    """The walk in the training process: the exact position at any step boundary, for checkpoints and records."""

    def __init__(self, walk_args: dict[str, Any], first: int, global_batch: int, block: int,
                 record: StepRecord | None) -> None:
        self.walk_args, self.first, self.global_batch, self.block, self.record = \
            walk_args, first, global_batch, block, record
        self._reset()

    def _reset(self) -> None:
        self.walk = make_walk(**self.walk_args)
        self.step = self.first

    def at(self, step: int) -> dict[str, Any]:
        """The walk's state after ``step`` optimizer steps of the stage."""
        if step < self.step:
            self._reset()
        while self.step < step:
            samples = self.walk.batch(self.global_batch, self.block)
            self.step += 1
            if self.record is not None:
                self.record.step(self.step, digest(samples, self.walk.names))
        return self.walk.state()


class StepRecord:
    """What a stage read, in its run directory: ``data/steps.jsonl`` and ``data/positions.jsonl``.

    ``steps.jsonl`` has one row per optimizer step: per source, the tokens the global batch
    read and a CRC of their token ranges (two runs read the same tokens iff the rows are
    equal). ``positions.jsonl`` has one row per checkpoint: the walk's whole state (every
    source's epoch and lane cursors), from which ``danube data-report`` counts what was read
    once, twice, never. Rows are written before their checkpoint, and rows after the step a
    run resumes from are dropped, so the files always describe the checkpointed run.
    """

    STEPS, POSITIONS = "steps.jsonl", "positions.jsonl"

    def __init__(self, directory: Path, resumed_step: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in (self.STEPS, self.POSITIONS):
            _keep_rows(self.dir / name, resumed_step)
        self._pending: list[str] = []

    def step(self, step: int, sources: dict[str, Any]) -> None:
        self._pending.append(json.dumps({"step": step, "sources": sources}, separators=(",", ":")))

    def checkpoint(self, step: int, state: dict[str, Any]) -> None:
        rows, self._pending = self._pending, []
        _append(self.dir / self.STEPS, rows)
        _append(self.dir / self.POSITIONS, [json.dumps({"step": step, "order": state}, separators=(",", ":"))])


def _append(path: Path, rows: list[str]) -> None:
    if not rows:
        return
    with open(path, "a") as f:
        f.write("\n".join(rows) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _keep_rows(path: Path, last_step: int) -> None:
    """Drop the rows of steps after ``last_step`` (and a torn last line) from a record file."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if row.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a record file (a torn last line ignored)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class _Block(NamedTuple):
    source: int
    ranges: list[tuple[int, int]]


class _ValBlocks:
    """Validation: consecutive blocks of every source's val split, the sources interleaved, never shuffled.

    Micro-batch ``v`` of the (at most ``batches``) validation micro-batches goes to rank
    ``v % world``: the same blocks are evaluated on any number of devices.
    """

    def __init__(self, streams: dict[str, TokenStream], names: list[str], block: int, micro: int,
                 rank: int, world: int, batches: int | None) -> None:
        self.streams, self.names, self.block, self.micro = streams, names, block, micro
        self.rank, self.world = rank, world
        counts = [streams[n].tokens // block if n in streams else 0 for n in names]
        total = sum(counts)
        full = total // micro
        n = full if full else (1 if total else 0)  # a val split smaller than one micro-batch: one short batch
        self.batches = n if batches is None else min(n, batches)
        self.counts = counts

    def _blocks(self) -> Iterator[_Block]:
        for r in range(max(self.counts, default=0)):
            for i, c in enumerate(self.counts):
                if r < c:
                    yield _Block(i, [(r * self.block, self.block)])

    def __len__(self) -> int:
        return len(range(self.rank, self.batches, self.world))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        blocks = self._blocks()
        for v in range(self.batches):
            samples = list(itertools.islice(blocks, self.micro))
            if v % self.world == self.rank:
                yield read_samples(self.streams, self.names, samples, self.block)

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


class OldOrder(ValueError):
    """A checkpoint whose data position was written by the per-rank litdata order of danube 0.1."""


class PretrainDataModule(L.LightningDataModule):
    """Pretraining batches along the run's one walk through its sources (:mod:`danube.data.order`).

    Args:
        sources: A prepared directory, a list of them, or ``{name: directory}``.
        seq_len: Tokens per training sequence (blocks hold ``seq_len + 1`` for the shifted targets).
        micro_batch_size: Sequences per batch and device.
        global_batch_size: Sequences per optimizer step, all devices and accumulation together
            (default: one micro-batch per device).
        steps: Optimizer steps of the stage (default: about one pass over the sources at these weights).
        weights: Mixture weights per source name (normalised); default: proportional to the
            training tokens in each manifest.
        seed: Seed of the walk (its permutations and mixture sequence).
        num_workers: DataLoader worker processes reading the training micro-batches.
        tokenizer_checksum: sha256 of the model's tokenizer; sources made with another are refused.
        val_batches: Validation micro-batches per evaluation, all devices together (None: all of the val splits).
        world_size: Devices the batches are shared over (the running trainer's, once attached).
        longest_seq_len: The recipe's longest sequence length (sizes the lanes; default ``seq_len``).
        piece_tokens: Tokens per shuffled piece (None: automatic, see :func:`danube.data.order.plan_layout`).
        lanes: The most lanes a source is read through.
        start: The walk's state at the stage's first step (the previous stage's end); None: every source at its start.
        record_dir: Where rank zero records what every step read (:class:`StepRecord`); None: nowhere.
        resume_old_order: Accept a checkpoint of danube 0.1's order, continuing with this order from each
            source's start (otherwise :class:`OldOrder` is raised).
    """

    def __init__(
        self,
        sources: dict[str, str] | list[str] | str,
        seq_len: int,
        micro_batch_size: int,
        *,
        global_batch_size: int | None = None,
        steps: int | None = None,
        weights: dict[str, float] | None = None,
        seed: int = 42,
        num_workers: int = 1,
        tokenizer_checksum: str | None = None,
        val_batches: int | None = 50,
        world_size: int = 1,
        longest_seq_len: int | None = None,
        piece_tokens: int | None = None,
        lanes: int = 512,
        start: dict | None = None,
        record_dir: str | Path | None = None,
        resume_old_order: bool = False,
    ) -> None:
        super().__init__()
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be positive, got {seq_len} and {micro_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.sources = named_sources(sources)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.steps = steps
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer_checksum = tokenizer_checksum
        self.val_batches = val_batches
        self.world_size = world_size
        self.longest_seq_len = max(seq_len, longest_seq_len or seq_len)
        self.piece_tokens, self.lanes = piece_tokens, lanes
        self.start = start
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self.resume_old_order = resume_old_order
        if weights is not None:
            check_mixture(weights, list(self.sources), "mixture weights")
        self._weights_arg = weights
        self.weights: dict[str, float] | None = None
        self.manifests: dict[str, dict] = {}
        self.train_streams: dict[str, TokenStream] = {}
        self.val_streams: dict[str, TokenStream] = {}
        self._resume: tuple[dict | None, int] | None = None  # (walk state, step) from a checkpoint
        self._planner: _Planner | None = None

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
            train = TokenStream(directory / "train", manifest["dtype"])
            if train.tokens < self.longest_seq_len + 1:
                raise ValueError(
                    f"data source {name!r} ({directory}): {train.tokens} training tokens, fewer than one "
                    f"{self.longest_seq_len + 1}-token sample of the recipe's longest sequence; prepare more data "
                    "or lower seq_len"
                )
            self.manifests[name] = manifest
            self.train_streams[name] = train
            val = TokenStream(directory / "val", manifest["dtype"])
            if val.tokens >= block:
                self.val_streams[name] = val
            else:
                log.info("data source %r has no %s block of %d tokens; it is left out of validation", name, "val",
                         block)
        if len(set(checksums.values())) > 1:
            raise ValueError(f"data sources were tokenized with different tokenizers: {checksums}")
        tokens = {n: m["totals"]["train"]["tokens"] for n, m in self.manifests.items()}
        raw = self._weights_arg or tokens
        total = sum(raw.values())
        self.weights = {n: raw[n] / total for n in self.sources}

    def setup(self, stage: str | None = None) -> None:
        if not self.manifests:
            self._validate()

    def layouts(self) -> dict[str, Layout]:
        """How each source is cut into pieces and lanes (a resumed walk keeps its recorded ones)."""
        return {name: plan_layout(s.tokens, s.fingerprint, longest_block=self.longest_seq_len + 1,
                                  piece_tokens=self.piece_tokens, lanes=self.lanes)
                for name, s in self.train_streams.items()}

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, self.world_size

    def _geometry(self) -> tuple[int, int, int]:
        """(global batch in samples, accumulation, steps of the stage) on the running world size."""
        _, world = self._rank_world()
        per_pass = self.micro_batch_size * world
        global_batch = self.global_batch_size or per_pass
        if global_batch % per_pass:
            raise ValueError(f"a global batch of {global_batch} sequences is not a whole number of micro-batches of "
                             f"{self.micro_batch_size} on each of {world} device(s)")
        steps = self.steps
        if steps is None:  # about one pass over the sources at these weights
            block = self.seq_len + 1
            steps = max(1, int(min(s.tokens / (self.weights[n] * block * global_batch)
                                   for n, s in self.train_streams.items() if self.weights[n] > 0)))
        return global_batch, global_batch // per_pass, steps

    # ---- loaders

    def train_dataloader(self):
        if not self.manifests:
            self.setup("fit")
        rank, world = self._rank_world()
        global_batch, accumulate, steps = self._geometry()
        state, first = self._resume if self._resume is not None else (self.start, 0)
        walk_args = {"layouts": self.layouts(), "seed": self.seed, "state": state, "weights": self.weights}
        make_walk(**walk_args)  # a recorded walk that does not fit these sources fails here, before any step
        block = self.seq_len + 1
        record = StepRecord(self.record_dir, first) if self.record_dir is not None and rank == 0 else None
        if rank == 0:
            self._say_epochs((steps - first) * global_batch * block)
        self._planner = _Planner(walk_args, first, global_batch, block, record)
        dataset = _TrainSteps(self.train_streams, walk_args, block, self.micro_batch_size, rank, world, accumulate,
                              first, steps)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                             worker_init_fn=worker_init if self.num_workers else None)
        return _Batches(loader, pin=torch.cuda.is_available())

    def _say_epochs(self, tokens: int) -> None:
        """Warn about a source this stage reads more than once over (expected share of ``tokens``)."""
        for name, stream in self.train_streams.items():
            share = tokens * self.weights[name]
            if share > stream.tokens:
                log.warning("data source %r holds %s training tokens and this stage reads ~%s of it: ~%.1f epochs, "
                            "every token read again each epoch (with a new order)", name, f"{stream.tokens:,}",
                            f"{share:,.0f}", share / stream.tokens)

    def val_dataloader(self):
        if not self.manifests:
            self.setup("validate")
        if not self.val_streams:
            log.warning("no validation data: the val/ splits of %s hold no %d-token block",
                        [str(d) for d in self.sources.values()], self.seq_len + 1)
            return []
        rank, world = self._rank_world()
        return _ValBlocks(self.val_streams, self.source_names, self.seq_len + 1, self.micro_batch_size, rank, world,
                          self.val_batches)

    # ---- resume

    def state_dict(self) -> dict[str, Any]:
        """The walk's position at the trainer's current step (Lightning stores it in checkpoints).

        Rank zero also records the steps read since the last checkpoint, before the
        checkpoint is written (:class:`StepRecord`).
        """
        if self._planner is None:
            if self._resume is not None:
                return {"format": FORMAT, "order": self._resume[0], "step": self._resume[1]}
            return {}
        return self.state_at(self.trainer.global_step if self.trainer is not None else self._planner.step)

    def state_at(self, step: int) -> dict[str, Any]:
        """The position after ``step`` optimizer steps of the stage (recorded, on rank zero); needs the train loader."""
        if self._planner is None:
            raise RuntimeError("the position is known once train_dataloader() was built")
        state = self._planner.at(step)
        if self._planner.record is not None:
            self._planner.record.checkpoint(step, state)
        return {"format": FORMAT, "order": state, "step": step, "seq_len": self.seq_len}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the walk at the step the state was saved at (applied when the train loader is built)."""
        if not state_dict:
            return
        if state_dict.get("format") != FORMAT:
            if not self.resume_old_order:
                raise OldOrder(
                    "the checkpoint's data position was written by danube 0.1's per-rank order, which this release "
                    "replaced (README: one walk through the data); continuing would read an unknown mix of tokens "
                    "again. Pass data.resume_old_order=true to continue with the new order from each source's start")
            step = int(self.trainer.global_step) if self.trainer is not None else 0
            log.warning("resuming a checkpoint of the old data order at step %d: the new walk starts at every "
                        "source's beginning (data.resume_old_order=true); tokens read before may be read again", step)
            self._resume = (None, step)
            return
        self._resume = (state_dict["order"], int(state_dict["step"]))


def data_position(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The data state a pretraining checkpoint holds (None: none; a dict without ``order``: the old order)."""
    return checkpoint.get(PretrainDataModule.__qualname__)
