"""Data loading: tokens per second per rank out of prepared shards through PretrainDataModule.

The shards are the embedded sample (``danube.data.sample.ensure_sample_data``, built once
under ``data/sample`` as ``python train.py`` does), or any ``danube prepare`` output given
with ``--shards`` (the tokenizer beside it need not be loaded: only ids are read). One
process is one rank: the loader is the training loader of ``train.py``
(:meth:`PretrainDataModule.train_dataloader`), batches of ``micro_batch`` blocks of
``seq_len + 1`` tokens read along the run's one walk (:mod:`danube.data.order`).

A larger world is simulated: the datamodule is given ``world_size=W`` without a trainer or
``torch.distributed``, so this process is rank 0 of ``W``. Every rank (and each of its
loader workers) replays the bookkeeping of the whole global batch of each step and reads
only its own micro-batches, ``1 / W`` of them: the larger the world, the more walk per token
read, which is what the ``world`` rows show. The walk wraps to a new epoch (a new
permutation) whenever a source is used up, so a pass reads ``--tokens`` tokens per rank
whatever the size of the shards (the embedded sample holds 1.38M).

    python bench/data_loading.py                  # seq 2048 and 16384, batch 8, workers 0/1/2, one and two
                                                  # sources, world 1, 8 and 64, and the 576-sample global batch
    python bench/data_loading.py --quick          # fewer settings, < 1 minute (prints only)
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from pathlib import Path

import benchlib
from danube.data.pretrain import PretrainDataModule

log = logging.getLogger("bench.data_loading")

REPORT_GLOBAL_BATCH = 576  # the report's global batch: 576 x 2,048 = 1,179,648 tokens per optimizer step


def sample_shards(root: Path) -> Path:
    from danube.data.sample import ensure_sample_data

    _, shards = ensure_sample_data(root, vocab_size=4096)
    return shards


def one_pass(sources: dict[str, str], seq_len: int, batch: int, workers: int, world: int, global_batch: int,
             steps: int, max_batches: int | None) -> dict:
    """Seconds to the first batch, then tokens/s of rank 0 of ``world`` over the rest of ``steps`` optimizer steps."""
    dm = PretrainDataModule(sources=sources, seq_len=seq_len, micro_batch_size=batch, num_workers=workers,
                            global_batch_size=global_batch, steps=steps, world_size=world, val_batches=0, seed=0)
    dm.setup("fit")
    start = time.perf_counter()
    it = iter(dm.train_dataloader())
    first = next(it)
    t_first = time.perf_counter()
    tokens = 0
    n = 0
    for b in it:
        tokens += b["tokens"].shape[0] * (b["tokens"].shape[1] - 1)  # training tokens: targets per row
        n += 1
        if max_batches is not None and n >= max_batches:
            break
    end = time.perf_counter()
    del it  # stop the workers before the next setting starts its own
    assert first["tokens"].shape == (batch, seq_len + 1), first["tokens"].shape
    return {"first_s": t_first - start, "tokens": tokens + batch * seq_len,
            "steady": tokens / max(end - t_first, 1e-9), "overall": (tokens + batch * seq_len) / (end - start)}


def settings(args) -> list[tuple[int, int, int, int, int]]:
    """(seq_len, sources, world, global batch, workers) of every row, in order."""
    out = []
    for seq_len, n_sources in itertools.product(args.seq_len, args.sources):
        for world in args.world:
            per_pass = args.micro_batch * world
            batches = [per_pass]  # one micro-batch per rank and step (no accumulation)
            for g in args.global_batch:
                if world == 1 or g == per_pass:
                    continue  # on one rank accumulation reads every sample it walks: the same ratio as above
                if g % per_pass:
                    log.info("global batch %d skipped at world %d: not a whole number of micro-batches of %d per "
                             "rank", g, world, args.micro_batch)
                    continue
                batches.append(g)
            for global_batch, workers in itertools.product(batches, args.workers):
                out.append((seq_len, n_sources, world, global_batch, workers))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=None, help="a `danube prepare` output (default: the embedded sample)")
    parser.add_argument("--data-root", default=os.environ.get("DANUBE_HOME", ".") + "/data/sample",
                        help="where the embedded sample is built (default: data/sample, as train.py)")
    parser.add_argument("--seq-len", nargs="+", type=int, default=[2048, 16384])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", type=int, default=[1, 2],
                        help="1: one source; 2: the same shards as two sources (the weighted-mixture path)")
    parser.add_argument("--world", nargs="+", type=int, default=[1, 8, 64],
                        help="world sizes; this process is rank 0 (simulated: no trainer, no torch.distributed)")
    parser.add_argument("--global-batch", nargs="*", type=int, default=[REPORT_GLOBAL_BATCH],
                        help="also these global batches (samples per optimizer step, all ranks) in each world > 1 "
                             "they divide into micro-batches (gradient accumulation); the default, 576, is the "
                             "report's 1.18M tokens at seq 2048 (each row also runs with one micro-batch per rank)")
    parser.add_argument("--tokens", type=int, default=20_000_000,
                        help="training tokens rank 0 reads per pass (sets the stage's steps; the walk wraps to new "
                             "epochs as needed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batches", type=int, default=None, help="stop a pass after this many batches")
    parser.add_argument("--quick", action="store_true",
                        help="seq 2048, workers 0 and 1, one source, world 1 and 8, 5M tokens, 2 repeats")
    benchlib.add_write_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.quick:
        args.seq_len, args.workers, args.sources, args.repeats = args.seq_len[:1], [0, 1], [1], 2
        args.world, args.tokens = [w for w in args.world if w <= 8] or [1], min(args.tokens, 5_000_000)
    shards = Path(args.shards) if args.shards else sample_shards(Path(args.data_root))
    header = ["seq", "batch", "sources", "workers", "world", "global batch", "accum", "first batch s",
              "tokens/pass", "tokens/s steady", "tokens/s incl. start"]
    rows, best, worst = [], 0.0, None
    start_all = time.perf_counter()
    for seq_len, n_sources, world, global_batch, workers in settings(args):
        sources = {f"s{i}": str(shards) for i in range(n_sources)}
        accum = global_batch // (args.micro_batch * world)
        per_step = args.micro_batch * accum * seq_len  # tokens rank 0 reads per optimizer step
        steps = max(2, -(-args.tokens // per_step))
        runs = [one_pass(sources, seq_len, args.micro_batch, workers, world, global_batch, steps, args.max_batches)
                for _ in range(args.repeats)]
        steady = benchlib.median([r["steady"] for r in runs])
        best = max(best, steady)
        if worst is None or steady < worst[0]:
            worst = (steady, seq_len, n_sources, workers, world, global_batch)
        rows.append([seq_len, args.micro_batch, n_sources, workers, world, global_batch, accum,
                     f"{benchlib.median([r['first_s'] for r in runs]):.2f}", f"{runs[0]['tokens']:,}",
                     f"{steady:,.0f}", f"{benchlib.median([r['overall'] for r in runs]):,.0f}"])
        log.info("seq %d sources %d workers %d world %d global batch %d: %s tokens/s steady", seq_len, n_sources,
                 workers, world, global_batch, f"{steady:,.0f}")
    log.info("all settings: %.0f s", time.perf_counter() - start_all)
    note = (f"Shards: {'the embedded sample (1.38M training tokens)' if not args.shards else shards}. "
            "One process = one rank: rank 0 of *world* (a world > 1 simulated by `world_size` without a trainer; "
            "each rank, and each of its loader workers, walks every sample of the global batch and reads its "
            "1 / world share). *global batch*: samples per optimizer step, all ranks; *accum*: micro-batches per "
            "rank and step. *tokens/pass*: training tokens (seq_len per row) rank 0 reads in a pass, the walk "
            "wrapping to new epochs of the sample as needed; *steady*: from the second batch to the end of the "
            "pass; *incl. start*: from building the loader (worker start-up included). "
            f"Median of {args.repeats} passes.\n")
    benchlib.publish("data_loading_quick" if args.quick else "data_loading",
                     "Data loading, after: one walk read from memory-mapped shards", header, rows, note,
                     write=benchlib.should_write(args))
    if worst is not None:
        steady, seq_len, n_sources, workers, world, global_batch = worst
        print(f"lowest: {steady:,.0f} tokens/s per rank (seq {seq_len}, {n_sources} source(s), {workers} worker(s), "
              f"world {world}, global batch {global_batch})")
    print(f"tokens_per_sec={best:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
