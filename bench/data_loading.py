"""Data loading: tokens per second per rank out of prepared shards through PretrainDataModule.

The shards are the embedded sample (``danube.data.sample.ensure_sample_data``, built once
under ``data/sample`` as ``python train.py`` does), or any ``danube prepare`` output given
with ``--shards`` (the tokenizer beside it need not be loaded: only ids are read). One
process is one rank: the loader is the training loader of ``train.py``
(:meth:`PretrainDataModule.train_dataloader`), batches of ``micro_batch`` blocks of
``seq_len + 1`` tokens.

    python bench/data_loading.py                  # seq 2048, batch 8, workers 0/1/2, one and two sources
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


def sample_shards(root: Path) -> Path:
    from danube.data.sample import ensure_sample_data

    _, shards = ensure_sample_data(root, vocab_size=4096)
    return shards


def one_epoch(sources: dict[str, str], seq_len: int, batch: int, workers: int, max_batches: int | None) -> dict:
    """Seconds to the first batch, then tokens/s over the rest of one pass (or ``max_batches``)."""
    dm = PretrainDataModule(sources=sources, seq_len=seq_len, micro_batch_size=batch, num_workers=workers,
                            val_batches=0, seed=0)
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
    assert first["tokens"].shape == (batch, seq_len + 1), first["tokens"].shape
    return {"first_s": t_first - start, "tokens": tokens, "steady": tokens / max(end - t_first, 1e-9),
            "overall": (tokens + batch * seq_len) / (end - start)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=None, help="a `danube prepare` output (default: the embedded sample)")
    parser.add_argument("--data-root", default=os.environ.get("DANUBE_HOME", ".") + "/data/sample",
                        help="where the embedded sample is built (default: data/sample, as train.py)")
    parser.add_argument("--seq-len", nargs="+", type=int, default=[2048])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", type=int, default=[1, 2],
                        help="1: one source; 2: the same shards as two sources (the weighted-mixture path)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batches", type=int, default=None, help="stop a pass after this many batches")
    parser.add_argument("--quick", action="store_true", help="workers 0 and 1, one source, 2 repeats")
    benchlib.add_write_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.quick:
        args.workers, args.sources, args.repeats = [0, 1], [1], 2
    shards = Path(args.shards) if args.shards else sample_shards(Path(args.data_root))
    header = ["seq", "batch", "sources", "workers", "first batch s", "tokens/pass", "tokens/s steady",
              "tokens/s incl. start"]
    rows, best = [], 0.0
    for seq_len, n_sources, workers in itertools.product(args.seq_len, args.sources, args.workers):
        sources = {f"s{i}": str(shards) for i in range(n_sources)}
        runs = [one_epoch(sources, seq_len, args.micro_batch, workers, args.max_batches) for _ in range(args.repeats)]
        steady = benchlib.median([r["steady"] for r in runs])
        best = max(best, steady)
        rows.append([seq_len, args.micro_batch, n_sources, workers, f"{benchlib.median([r['first_s'] for r in runs]):.2f}",
                     f"{runs[0]['tokens']:,}", f"{steady:,.0f}", f"{benchlib.median([r['overall'] for r in runs]):,.0f}"])
        log.info("seq %d sources %d workers %d: %s tokens/s steady", seq_len, n_sources, workers, f"{steady:,.0f}")
    note = (f"Shards: {'the embedded sample' if not args.shards else shards}. "
            "One process = one rank. *steady*: training tokens (seq_len per row) from the second batch to "
            "the end of a pass over the shards; *incl. start*: from building the loader (worker start-up "
            f"included). Median of {args.repeats} passes.\n")
    benchlib.publish("data_loading_quick" if args.quick else "data_loading", "Data loading", header, rows, note,
                     write=benchlib.should_write(args))
    print(f"tokens_per_sec={best:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
