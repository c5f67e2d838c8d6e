"""Preparation: megabytes of text per second into token shards with ``danube prepare`` (the datatrove pipeline).

Input is the embedded sample corpus (``data/sample/corpus.jsonl``, built on first use as
``python train.py`` does) written ``--copies`` times into a temporary folder, as JSONL and
as plain text (documents separated by blank lines), tokenized with the sample's 4,096-piece
SentencePiece model. MB/s counts input bytes over the whole call (planning, the tasks,
the merge, the manifest). The reference row is the tokenizer alone: SentencePiece encoding
the same documents on one core, nothing read or written; ``x 1 worker`` and ``x encode``
compare each run with one worker and with that reference.

    python bench/prepare.py                 # 4 copies (~21 MB), 1 and 2 workers, jsonl and txt
    python bench/prepare.py --quick         # 1 copy, jsonl, < 1 minute (prints only)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from danube.corpus.prepare import prepare

log = logging.getLogger("bench.prepare")


def make_inputs(corpus: Path, folder: Path, copies: int, fmt: str) -> list[Path]:
    """``copies`` files of the sample corpus in ``fmt`` (jsonl or txt)."""
    lines = corpus.read_text(encoding="utf-8").splitlines()
    if fmt == "jsonl":
        content = "\n".join(lines) + "\n"
    else:  # one document per paragraph group; blank lines inside documents would split them, so squeeze them
        docs = [json.loads(line)["text"] for line in lines]
        content = "\n\n".join("\n".join(x for x in d.splitlines() if x.strip()) for d in docs) + "\n"
    files = []
    for i in range(copies):
        path = folder / f"part{i:03d}.{fmt}"
        path.write_text(content, encoding="utf-8")
        files.append(path)
    return files


def encode_speed(corpus: Path, tokenizer: Path, copies: int, repeats: int) -> float:
    """MB/s of SentencePiece alone on one core over the corpus's documents (``copies`` times), in batches."""
    from encode import encode_rate

    from danube.data.tokenizer import Tokenizer

    sp = Tokenizer(tokenizer).sp
    docs = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()] * copies
    return encode_rate(lambda batch: sp.encode(batch, num_threads=1), docs, repeats)[0]


class _JsonlFiles:
    """A minimal datatrove reader (a callable step): task ``rank`` reads files ``rank::world_size``.

    (datatrove's own JsonlReader needs orjson, which danube does not install.)
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = [str(f) for f in files]

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from datatrove.data import Document

        for path in self.files[rank::world_size]:
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    yield Document(text=json.loads(line)["text"], id=f"{path}:{i}")


def datatrove_tokenize(files: list[Path], tokenizer: Path, out: Path, workers: int) -> int:
    """datatrove's own DocumentTokenizer (Hugging Face ``tokenizers``, danube's exported pipeline for
    ``tokenizer``) over ``files``, one task per file; returns the tokens written."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per task, as danube's tasks
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.tokens import DocumentTokenizer

    from danube.data.tokenizer import Tokenizer, hf_backend

    tok = Tokenizer(tokenizer)
    out.mkdir(parents=True)
    hf_backend(tok).save(str(out / "tokenizer.json"))
    pipeline = [_JsonlFiles(files), DocumentTokenizer(str(out / "ds"), str(out / "tokenizer.json"),
                                                      eos_token=tok.sp.id_to_piece(tok.eos_id),
                                                      shuffle_documents=False)]
    LocalPipelineExecutor(pipeline, tasks=len(files), workers=workers, logging_dir=str(out / "logs"),
                          start_method="fork").run()
    return sum((p.stat().st_size for p in (out / "ds").glob("*.ds")), 0) // 2  # uint16 tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("DANUBE_HOME", ".") + "/data/sample",
                        help="where the embedded sample is built (default: data/sample, as train.py)")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--format", nargs="+", default=["jsonl", "txt"], choices=["jsonl", "txt"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 copy, jsonl, 2 repeats")
    benchlib.add_write_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if args.quick:
        args.copies, args.format, args.repeats = 1, ["jsonl"], 2
    from danube.data.sample import CORPUS, ensure_sample_data

    tokenizer, _ = ensure_sample_data(args.data_root, vocab_size=4096)
    corpus = Path(args.data_root) / CORPUS
    header = ["format", "input MB", "workers", "seconds", "MB/s", "tokens", "tokens/s", "x 1 worker", "x encode"]
    rows, best = [], 0.0
    encode_mb_s = encode_speed(corpus, tokenizer, args.copies, args.repeats)
    rows.append(["SentencePiece encode only, 1 core", "", 1, "", f"{encode_mb_s:.2f}", "", "", "", "1.00"])
    one_worker: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="danube-bench-prepare-"))
    try:
        for fmt, workers in itertools.product(args.format, args.workers):
            folder = work / f"in-{fmt}"
            if not folder.is_dir():
                folder.mkdir()
                make_inputs(corpus, folder, args.copies, fmt)
            mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
            seconds, tokens = [], 0
            for r in range(args.repeats):
                out = work / f"out-{fmt}-{workers}-{r}"
                start = time.perf_counter()
                manifest = prepare([folder], out, tokenizer, num_workers=workers, chunk_bytes="64MB")
                seconds.append(time.perf_counter() - start)
                tokens = manifest["totals"]["train"]["tokens"] + manifest["totals"]["val"]["tokens"]
                shutil.rmtree(out)
            s = benchlib.median(seconds)
            best = max(best, mb / s)
            if workers == 1:
                one_worker[fmt] = mb / s
            scale = f"{mb / s / one_worker[fmt]:.2f}" if fmt in one_worker else ""
            rows.append([fmt, f"{mb:.1f}", workers, f"{s:.2f}", f"{mb / s:.2f}", f"{tokens:,}", f"{tokens / s:,.0f}",
                         scale, f"{mb / s / encode_mb_s:.2f}"])
        if not args.quick:  # the engine's own tokenize step on the same jsonl, as a reference
            folder = work / "in-jsonl"
            mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
            for workers in args.workers:
                seconds, tokens = [], 0
                for r in range(args.repeats):
                    start = time.perf_counter()
                    tokens = datatrove_tokenize(sorted(folder.iterdir()), tokenizer, work / f"dt-{workers}-{r}", workers)
                    seconds.append(time.perf_counter() - start)
                    shutil.rmtree(work / f"dt-{workers}-{r}")
                s = benchlib.median(seconds)
                rows.append(["jsonl: datatrove's DocumentTokenizer (tokenizers)", f"{mb:.1f}", workers, f"{s:.2f}",
                             f"{mb / s:.2f}", f"{tokens:,}", f"{tokens / s:,.0f}", "", f"{mb / s / encode_mb_s:.2f}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    note = (f"Input: the embedded sample corpus x{args.copies}, "
            f"4,096-piece SentencePiece tokenizer. Median of {args.repeats} runs of the whole `prepare` call "
            "(datatrove pipeline: tasks, merge, manifest). Each task encodes on one core, so workers scale "
            "with cores; `x encode` is the pipeline against SentencePiece alone on one core.\n")
    benchlib.publish("prepare_quick" if args.quick else "prepare", "Preparing shards", header, rows, note,
                     write=benchlib.should_write(args))
    print(f"mb_per_sec={best:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
