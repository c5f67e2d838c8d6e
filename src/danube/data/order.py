"""The run's one walk through its corpus: which tokens every optimizer step reads.

A pretraining run reads each source front to back along one seeded order, across its
stages, world sizes, preemptions and mixture changes. The order depends on the seed, the
sources and the position only:

- A source's training split is one *stream* of tokens (:class:`~danube.data.streams.TokenStream`),
  cut into *pieces* of ``piece`` tokens. Each *epoch* of the source is a permutation of its
  pieces, drawn from ``(seed, source name, epoch)``.
- The permuted pieces are dealt to ``lanes`` *lanes* (lane ``j`` holds pieces ``j``,
  ``j + lanes``, ... of the permutation), each read front to back. A source's samples
  go to its lanes in turn, so one batch holds text from many places of the corpus, and
  a sample is the next ``seq_len + 1`` tokens of its lane, whatever ``seq_len`` is: a
  longer-sequence stage goes on where the shorter one stopped, and no token is read
  twice in an epoch. A lane's sample may span two pieces (at most ``seq_len / piece``
  of the samples; the pieces are large).
- An epoch ends when no lane holds a whole sample; the few tokens left at the lanes' ends
  are counted as skipped, the log says so, and the next epoch draws a new permutation.
- Which source sample ``g`` (counted over the whole run) comes from is a Weyl sequence
  over the current weights: ``frac(u0 + g * 0.618...)`` falls in the source's share
  of ``[0, 1)``. A mixture change (a stage's weights, or new weights on a resume)
  changes only which source the next samples come from; every source keeps its
  position, a new source starts at its beginning, a dropped one keeps its position.

The global batch of a step is its ``B`` samples in order; micro-batch ``m`` of the step
is samples ``[m * b, (m + 1) * b)``, and rank ``r`` of ``W`` takes micro-batches
``r, r + W, ...``: the same samples make the same step on any number of devices.

The walk's state (:meth:`Walk.state`: each source's epoch and lane cursors, plus the
samples drawn) is all a checkpoint needs to continue it, on any world size.
"""

from __future__ import annotations

import copy
import logging
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "danube-order/1"
GOLDEN = (5**0.5 - 1) / 2  # the irrational step with the most even coverage of [0, 1)
MIN_PIECE, MAX_PIECE = 1 << 12, 1 << 20
PIECES_PER_SOURCE = 4096  # the automatic piece size aims at this many pieces per source
BLOCKS_PER_LANE = 64  # a lane holds at least this many of the recipe's longest samples


class OrderMismatch(ValueError):
    """A recorded walk that does not fit this run's data (another source behind a name, another seed)."""


@dataclass(frozen=True)
class Layout:
    """How one source is cut up: fixed for the run once its walk has started (it is in the state)."""

    tokens: int
    fingerprint: str
    piece: int
    lanes: int

    @property
    def pieces(self) -> int:
        return -(-self.tokens // self.piece)


def plan_layout(tokens: int, fingerprint: str, *, longest_block: int, piece_tokens: int | None, lanes: int) -> Layout:
    """The layout of a source of ``tokens`` tokens for a recipe whose longest sample is ``longest_block`` tokens.

    ``piece_tokens=None`` picks a power of two giving about :data:`PIECES_PER_SOURCE` pieces,
    between 4,096 and 1,048,576 tokens. Lanes are at most ``lanes`` and at most one per
    piece, and each holds at least :data:`BLOCKS_PER_LANE` of the longest samples when the
    source is big enough (a small source has fewer lanes and more text per lane).
    """
    if piece_tokens is None:
        want = max(1, tokens // PIECES_PER_SOURCE)
        piece_tokens = min(MAX_PIECE, max(MIN_PIECE, 1 << (want.bit_length() - 1)))
    pieces = -(-tokens // piece_tokens)
    k = max(1, min(lanes, pieces, tokens // (BLOCKS_PER_LANE * longest_block)))
    return Layout(tokens=tokens, fingerprint=fingerprint, piece=piece_tokens, lanes=k)


class _Epoch:
    """One epoch of one source: its permutation dealt to the lanes, with each lane's piece offsets."""

    def __init__(self, layout: Layout, seed: int, name: str, epoch: int) -> None:
        n, p, k = layout.pieces, layout.piece, layout.lanes
        perm = np.random.default_rng([seed, zlib.crc32(name.encode()), epoch]).permutation(n)
        sizes = np.full(n, p, dtype=np.int64)
        sizes[-1] = layout.tokens - (n - 1) * p
        self.piece = p
        self.sizes = sizes
        self.lane_pieces = [perm[j::k] for j in range(k)]
        self.lane_starts = [np.concatenate([[0], np.cumsum(sizes[pieces])]) for pieces in self.lane_pieces]
        self.lane_len = np.array([int(s[-1]) for s in self.lane_starts], dtype=np.int64)

    def ranges(self, lane: int, start: int, length: int) -> list[tuple[int, int]]:
        """``length`` tokens of ``lane`` from ``start``, as ``(stream start, length)`` ranges of the source."""
        starts, pieces = self.lane_starts[lane], self.lane_pieces[lane]
        q = int(np.searchsorted(starts, start, side="right")) - 1
        out = []
        while length > 0:
            piece = int(pieces[q])
            at = start - int(starts[q])
            take = min(length, int(self.sizes[piece]) - at)
            out.append((piece * self.piece + at, take))
            start, length, q = start + take, length - take, q + 1
        return out

    def read_prefixes(self, cursors: np.ndarray) -> np.ndarray:
        """Tokens read from the front of every piece when lane ``j`` has read ``cursors[j]`` tokens."""
        read = np.zeros(self.sizes.size, dtype=np.int64)
        for j, (pieces, starts) in enumerate(zip(self.lane_pieces, self.lane_starts)):
            read[pieces] = np.clip(int(cursors[j]) - starts[:-1], 0, self.sizes[pieces])
        return read


class Sample:
    """One sample of a global batch: its source (index into the walk's names) and where it is read.

    ``ranges`` (the source's token ranges) is worked out when asked: a rank asks only for its own
    samples, so replaying a global batch costs next to nothing per sample it does not read.
    """

    __slots__ = ("source", "epoch", "lane", "start", "length", "_epoch")

    def __init__(self, source: int, epoch: int, lane: int, start: int, length: int, lanes: _Epoch) -> None:
        self.source, self.epoch, self.lane, self.start, self.length, self._epoch = \
            source, epoch, lane, start, length, lanes

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return self._epoch.ranges(self.lane, self.start, self.length)


class GlobalBatch:
    """A step's samples, as arrays: where each is read (source, epoch, lane, lane offset).

    Indexing gives :class:`Sample` objects, made only for the samples asked for: a rank of
    a large world replays every global batch and reads a small slice of it.
    """

    def __init__(self, size: int, block: int) -> None:
        self.block = block
        self.source = np.zeros(size, dtype=np.int64)
        self.epoch = np.zeros(size, dtype=np.int64)
        self.lane = np.zeros(size, dtype=np.int64)
        self.start = np.zeros(size, dtype=np.int64)
        self._epochs: dict[tuple[int, int], _Epoch] = {}

    def put(self, at: Any, source: int, epoch: int, lane: Any, start: Any, lanes: _Epoch) -> None:
        self.source[at], self.epoch[at], self.lane[at], self.start[at] = source, epoch, lane, start
        self._epochs[(source, epoch)] = lanes

    def __len__(self) -> int:
        return self.source.size

    def _sample(self, i: int) -> Sample:
        source, epoch = int(self.source[i]), int(self.epoch[i])
        return Sample(source, epoch, int(self.lane[i]), int(self.start[i]), self.block, self._epochs[(source, epoch)])

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._sample(i) for i in range(*index.indices(len(self)))]
        return self._sample(index)

    def __iter__(self) -> Iterator[Sample]:
        return (self._sample(i) for i in range(len(self)))


class Walk:
    """The deterministic walk: global batches of samples, from a saved state or the beginning.

    Args:
        layouts: this run's sources (name -> :class:`Layout`) in the run's order; a name the
            state already has keeps its recorded layout (the tokens and fingerprint must match).
        seed: the run's seed (a state records its own: a resume keeps the order it started).
        state: :meth:`state` of an earlier walk, to continue it (None: every source at its start).
        announce: log each source's new epoch (one process per run does).
    """

    def __init__(self, layouts: dict[str, Layout], seed: int, state: dict | None = None, announce: bool = False) -> None:
        self.names = list(layouts)
        self.announce = announce
        if state is None:
            state = {"format": FORMAT, "seed": int(seed), "samples": 0, "sources": {}}
        elif state.get("format") != FORMAT:
            raise OrderMismatch(f"a data position of format {state.get('format')!r}, not {FORMAT}")
        self._state = copy.deepcopy(state)
        self.seed = int(self._state["seed"])
        sources = self._state["sources"]
        self.layouts: dict[str, Layout] = {}
        for name, want in layouts.items():
            if name in sources:
                s = sources[name]
                if (s["tokens"], s["fingerprint"]) != (want.tokens, want.fingerprint):
                    raise OrderMismatch(
                        f"data source {name!r} holds {want.tokens:,} training tokens (shards {want.fingerprint}) but "
                        f"the recorded walk read one of {s['tokens']:,} (shards {s['fingerprint']}): its recorded "
                        "position would point at other text")
                self.layouts[name] = Layout(s["tokens"], s["fingerprint"], s["piece"], s["lanes"])
            else:
                self.layouts[name] = want
                sources[name] = {"tokens": want.tokens, "fingerprint": want.fingerprint, "piece": want.piece,
                                 "lanes": want.lanes, "epoch": 0, "next_lane": 0, "cursors": [0] * want.lanes,
                                 "finished": [], "read": 0, "skipped": 0}
        self._cursors = {n: np.array(sources[n]["cursors"], dtype=np.int64) for n in self.names}
        self._epochs: dict[str, _Epoch] = {}
        self._u0 = float(np.random.default_rng([self.seed, 0x6D6978]).random())
        self.set_weights({n: 1.0 for n in self.names})

    # -- the mixture ---------------------------------------------------------------------------
    def set_weights(self, weights: dict[str, float]) -> None:
        """The share of the next samples each source gives (normalised; a zero share is never drawn)."""
        w = np.array([float(weights.get(n, 0.0)) for n in self.names], dtype=np.float64)
        if w.sum() <= 0:
            raise ValueError(f"mixture weights {weights} give no source of {self.names} a positive share")
        self._edges = np.cumsum(w / w.sum())[:-1]

    def picks(self, first: int, count: int) -> np.ndarray:
        """The source index of run-wide samples ``first .. first + count - 1`` under the current weights."""
        g = first + np.arange(count, dtype=np.int64)
        # frac(g * GOLDEN) in two halves keeps full precision at the trillion-token sample counts.
        hi, lo = g >> 20, g & ((1 << 20) - 1)
        u = np.mod(self._u0 + np.mod(hi * ((1 << 20) * GOLDEN % 1.0), 1.0) + lo * GOLDEN, 1.0)
        return np.searchsorted(self._edges, u, side="right")

    # -- drawing -------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        return int(self._state["samples"])

    def _epoch(self, name: str) -> _Epoch:
        ep = self._epochs.get(name)
        if ep is None:
            ep = self._epochs[name] = _Epoch(self.layouts[name], self.seed, name, self._state["sources"][name]["epoch"])
        return ep

    def _take(self, source: int, where: np.ndarray, out: GlobalBatch) -> None:
        """The source's next samples, into positions ``where`` of ``out``.

        The lanes take the samples in turn from ``next_lane`` on; while every lane involved
        holds its share that is arithmetic on arrays. Near an epoch's end the samples are
        taken one by one, skipping the lanes too short for a sample, and a new epoch begins
        when none is left.
        """
        name, count, length = self.names[source], where.size, out.block
        s, cur = self._state["sources"][name], self._cursors[name]
        ep = self._epoch(name)
        k = len(cur)
        j0 = s["next_lane"]
        i = np.arange(count, dtype=np.int64)
        lanes = (j0 + i) % k
        hits = np.bincount(lanes, minlength=k)
        if count and np.all(cur + hits * length <= ep.lane_len):
            out.put(where, source, s["epoch"], lanes, cur[lanes] + length * (i // k), ep)  # i - k: the lane's last
            cur += hits * length
            s["next_lane"] = int((j0 + count) % k)
            s["read"] += count * length
            return
        for at in where:
            self._take_one(source, int(at), out)

    def _take_one(self, source: int, at: int, out: GlobalBatch) -> None:
        name, length = self.names[source], out.block
        s, cur = self._state["sources"][name], self._cursors[name]
        for _attempt in range(2):
            ep = self._epoch(name)
            j = s["next_lane"]
            if ep.lane_len[j] - cur[j] < length:  # the next lane in turn that holds a sample
                later = np.flatnonzero(ep.lane_len - cur >= length)
                if not later.size:
                    self._new_epoch(name, ep, length)
                    continue
                j = int(later[np.searchsorted(later, j) % later.size])
            out.put(at, source, s["epoch"], j, int(cur[j]), ep)
            cur[j] += length
            s["next_lane"] = (j + 1) % len(cur)
            s["read"] += length
            return
        raise ValueError(f"data source {name!r}: no lane of {self.layouts[name]} holds a sample of {length} tokens")

    def _new_epoch(self, name: str, ep: _Epoch, length: int) -> None:
        s, cur = self._state["sources"][name], self._cursors[name]
        left = int((ep.lane_len - cur).sum())
        if self.announce:
            log.info("data source %r: epoch %d read (%s tokens read, %s left at the lanes' ends as too short for a "
                     "%d-token sample); epoch %d begins with a new permutation",
                     name, s["epoch"], f"{int(cur.sum()):,}", f"{left:,}", length, s["epoch"] + 1)
        s["finished"].append([int(c) for c in cur])
        s["skipped"] += left
        s["epoch"] += 1
        s["next_lane"] = 0
        cur[:] = 0
        self._epochs.pop(name, None)

    def batch(self, size: int, block: int) -> GlobalBatch:
        """The next global batch: ``size`` samples of ``block`` tokens each, in order."""
        picks = self.picks(self.samples, size)
        out = GlobalBatch(size, block)
        for source in np.unique(picks):  # each source's samples in order: its lanes in turn
            self._take(int(source), np.flatnonzero(picks == source), out)
        self._state["samples"] += size
        return out

    def state(self) -> dict[str, Any]:
        """Everything needed to continue the walk (plain values: checkpoints load it with ``weights_only``)."""
        for name, cur in self._cursors.items():
            self._state["sources"][name]["cursors"] = [int(c) for c in cur]
        return copy.deepcopy(self._state)


def micro_batch_indices(rank: int, world_size: int, accumulate: int) -> list[int]:
    """The micro-batches of a step (``world_size * accumulate`` of them) that ``rank`` trains, in order."""
    return [a * world_size + rank for a in range(accumulate)]


def digest(batch: GlobalBatch, names: list[str]) -> dict[str, Any]:
    """A cheap record of what one global batch read: per source, its tokens and a CRC of where they were read.

    Where a sample is read (its source's epoch, lane and lane offset) fixes its tokens, so two
    batches with equal digests read the same tokens (to a CRC-32's certainty).
    """
    out = {}
    for i, name in enumerate(names):
        mine = batch.source == i
        if mine.any():
            where = np.stack([batch.epoch[mine], batch.lane[mine], batch.start[mine]], axis=1)
            out[name] = [int(mine.sum()) * batch.block, zlib.crc32(np.ascontiguousarray(where).tobytes())]
    return out


def coverage(state: dict[str, Any], name: str) -> np.ndarray:
    """How many tokens of source ``name`` the walk in ``state`` read k times: ``counts[k]`` for k = 0, 1, ...

    Computed from the recorded lane cursors of every epoch: within an epoch each lane reads
    its pieces front to back, so a piece's read tokens are a prefix of it.
    """
    s = state["sources"][name]
    layout = Layout(s["tokens"], s["fingerprint"], s["piece"], s["lanes"])
    epochs = [*s["finished"], s["cursors"]]
    prefixes = np.stack([_Epoch(layout, state["seed"], name, e).read_prefixes(np.asarray(c))
                         for e, c in enumerate(epochs)])
    prefixes = -np.sort(-prefixes, axis=0)  # per piece, the longest prefix first
    at_least = [layout.tokens] + [int(prefixes[k].sum()) for k in range(len(epochs))] + [0]
    return np.array([at_least[k] - at_least[k + 1] for k in range(len(epochs) + 1)], dtype=np.int64)
