"""Reading chat data as the Hub ships it: peak memory and records/s, danube's readers against datasets'.

Two synthetic files shaped like the report's largest sources:

- a MetaMathQA-like JSON array (``MetaMathQA-395K.json`` is one indented array of
  ``{type, query, original_question, response}``), and
- an UltraChat-like dataset directory (``data/train_sft-0000N-of-0000M-<hash>.parquet``
  with ``messages`` as a list of ``{content, role}`` structs).

Each reader runs in a fresh process that only iterates the records (no tokenization), so
its peak resident memory is the reader's own plus the imports' (reported apart).

    python bench/chat_data.py                  # 250k JSON records (~290 MB), 200k Parquet rows
    python bench/chat_data.py --quick          # 50k and 40k
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib


def write_json_array(path: Path, n: int) -> None:
    words = " ".join(["word"] * 80)
    with open(path, "w") as f:
        json.dump([{"type": "GSM_Rephrased", "query": f"What is {i} plus {3 * i}? {words}",
                    "original_question": f"q {i} " + words, "response": f"The answer is {4 * i}. " + words}
                   for i in range(n)], f, indent=4)


def write_parquet_repo(root: Path, n: int, shards: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    msg = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", msg)])
    (root / "data").mkdir(parents=True)
    per = n // shards
    vocab = [f"w{k}" for k in range(5000)]  # varied text, so the files compress as real text does
    rng = random.Random(0)

    def text(words: int) -> str:
        return " ".join(rng.choices(vocab, k=words))

    for s in range(shards):
        rows = [{"prompt": f"q{i}", "prompt_id": f"{i:064x}",
                 "messages": [{"content": text(60), "role": "user"}, {"content": text(120), "role": "assistant"}]}
                for i in range(s * per, (s + 1) * per)]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                       root / "data" / f"train_sft-{s:05d}-of-{shards:05d}-0123456789abcdef.parquet")


READERS = {
    "json/danube": """
from danube.data.records import read_json_array
n = sum(1 for _ in read_json_array(PATH))""",
    "json/datasets-streaming": """
import datasets
n = sum(1 for _ in datasets.load_dataset("json", data_files=PATH, split="train", streaming=True))""",
    "parquet/danube": """
from danube.data.records import Rows, Source
from danube.data.sft import SCHEMAS
n = sum(1 for _ in Rows(Source(path=PATH, split="train_sft"), SCHEMAS["ultrachat"]))""",
    "parquet/datasets-streaming": """
import datasets
n = sum(1 for _ in datasets.load_dataset(PATH, split="train_sft", streaming=True))""",
}


def measure(reader: str, path: Path, cache: Path) -> dict:
    """Peak RSS above the post-import baseline, seconds and records/s of one reader, in a fresh process."""
    code = f"""
import json, os, resource, time
os.environ["HF_DATASETS_CACHE"] = {str(cache)!r}
import datasets, pyarrow.parquet, danube.data.records, danube.data.sft
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
PATH = {str(path)!r}
start = time.perf_counter()
{READERS[reader]}
print(json.dumps({{"n": n, "s": time.perf_counter() - start, "base_mb": base / 1024,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-records", type=int, default=250_000)
    parser.add_argument("--parquet-rows", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="50k JSON records, 40k Parquet rows")
    benchlib.add_write_flags(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.json_records, args.parquet_rows = 50_000, 40_000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        json_file, repo = tmp / "MetaMathQA-like.json", tmp / "ultrachat-like"
        write_json_array(json_file, args.json_records)
        write_parquet_repo(repo, args.parquet_rows)
        sizes = {"json": json_file.stat().st_size,
                 "parquet": sum(f.stat().st_size for f in (repo / "data").iterdir())}
        for reader in READERS:
            kind = reader.split("/")[0]
            r = measure(reader, json_file if kind == "json" else repo, tmp / "cache")
            rows.append([reader, f"{r['n']:,}", f"{sizes[kind] / 2**20:,.0f}", f"{r['base_mb']:,.0f}",
                         f"{r['peak_mb']:,.0f}", f"{r['s']:.1f}", f"{r['n'] / r['s']:,.0f}"])
            print(reader, r, file=sys.stderr)
    note = ("*RSS after imports*: the process's resident set once datasets, pyarrow and danube are imported; "
            "*peak RSS*: its maximum while the reader iterates the records (nothing else is done with them; a "
            "peak equal to the first figure means the reader never held more than the imports). *json/danube*: "
            "`danube.data.records.read_json_array` (the standard library's `raw_decode`, one element at a time "
            "from a 1 MiB buffer); *json/datasets-streaming*: `load_dataset(\"json\", ..., streaming=True)`, "
            "which reads a JSON array whole. *parquet/danube*: `Rows` over a dataset directory (datasets "
            "resolves the split's files, pyarrow reads record batches of the needed columns); "
            "*parquet/datasets-streaming*: `load_dataset(DIR, split=..., streaming=True)`. One run each.\n")
    benchlib.publish("chat_data_quick" if args.quick else "chat_data", "Reading chat data",
                     ["reader", "records", "file MiB", "RSS after imports MiB", "peak RSS MiB", "seconds",
                      "records/s"], rows, note,
                     write=benchlib.should_write(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
