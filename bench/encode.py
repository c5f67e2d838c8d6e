"""Tokenizer encode speed on one core: SentencePiece against Hugging Face ``tokenizers``, same ids?

For each tokenizer (the Mistral/Danube2 ``tokenizer.model`` the tests ship, and the sample's
4,096-piece one), the embedded sample corpus is encoded document by document in batches of
512, on one core: by SentencePiece (``num_threads=1``) and by the ``tokenizers`` pipeline
danube exports for it (:func:`danube.data.tokenizer.hf_backend`, ``TOKENIZERS_PARALLELISM``
off). ``same ids`` counts the documents whose ids agree exactly. From the faster path's
tokens/s per core, the core-hours and 64-core nodes-hours that ``danube prepare`` needs for
the report's 1T (Danube) and 2T (Danube2) tokens, taking the pipeline at the 0.85x of bare
encoding that ``bench/prepare.py`` measures.

    python bench/encode.py            # writes its section of BENCHMARKS.md
    python bench/encode.py --quick    # a fifth of the corpus, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, before tokenizers is imported

import benchlib  # noqa: E402

PIPELINE_SHARE = 0.85  # danube prepare's speed per worker / bare encoding on one core (BENCHMARKS.md: prepare)


def encode_rate(encode, docs: list[str], repeats: int) -> tuple[float, float, list]:
    """(MB/s, tokens/s, ids) of ``encode`` over ``docs`` in batches of 512, median of ``repeats``."""
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    seconds, ids = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ids = [x for i in range(0, len(docs), 512) for x in encode(docs[i:i + 512])]
        seconds.append(time.perf_counter() - start)
    s = benchlib.median(seconds)
    return mb / s, sum(map(len, ids)) / s, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("DANUBE_HOME", ".") + "/data/sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a fifth of the corpus, 1 repeat")
    benchlib.add_write_flags(parser)
    args = parser.parse_args(argv)
    from danube.data.sample import CORPUS, ensure_sample_data
    from danube.data.tokenizer import Tokenizer, hf_backend

    sample_tok, _ = ensure_sample_data(args.data_root, vocab_size=4096)
    docs = [json.loads(line)["text"] for line in (Path(args.data_root) / CORPUS).read_text().splitlines()]
    if args.quick:
        docs, args.repeats = docs[: len(docs) // 5], 1
    mistral = benchlib.REPO / "tests" / "assets" / "mistral" / "tokenizer.model"
    header = ["tokenizer", "library", "MB/s", "tokens/s", "same ids", "1T tokens: core-h", "2T tokens: core-h"]
    rows = []
    for name, path in (("Mistral (Danube2), 32,000", mistral), ("sample, 4,096", sample_tok)):
        tok = Tokenizer(path)
        hf = hf_backend(tok)
        sp_mb, sp_tps, sp_ids = encode_rate(lambda b: tok.sp.encode(b, num_threads=1), docs, args.repeats)
        hf_mb, hf_tps, hf_ids = encode_rate(
            lambda b: [e.ids for e in hf.encode_batch(b, add_special_tokens=False)], docs, args.repeats)
        same = sum(a == b for a, b in zip(sp_ids, hf_ids))
        for library, mb, tps in (("sentencepiece", sp_mb, sp_tps), ("tokenizers", hf_mb, hf_tps)):
            per_core = tps * PIPELINE_SHARE
            rows.append([name, library, f"{mb:.2f}", f"{tps:,.0f}", f"{same}/{len(docs)}" if library == "tokenizers"
                         else "", f"{1e12 / per_core / 3600:,.0f}", f"{2e12 / per_core / 3600:,.0f}"])
    note = ("One core each (SentencePiece `num_threads=1`, `TOKENIZERS_PARALLELISM=false`), the embedded sample "
            f"corpus ({len(docs)} documents), batches of 512, median of {args.repeats}. Core-hours: the tokens at "
            f"{PIPELINE_SHARE}x the bare rate (what a `danube prepare` worker keeps of it); divide by the cores of a "
            "node for node-hours (a 64-core node: 1T tokens with SentencePiece and the Mistral tokenizer take the "
            "row's core-hours / 64).\n")
    benchlib.publish("encode", "Tokenizer encode speed (one core) and the report's corpora", header, rows, note,
                     write=benchlib.should_write(args) and not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
