"""Generation: tokens per second of ``danube.model.generate.generate`` against ``transformers``
``generate`` on the same model exported with ``danube.hf.to_hf``: same prompts, greedy.

The model is a randomly initialised member of the family (``tiny``: window 64, so prompts
plus continuation run past the window; ``small_100m``: the Llama 2 vocabulary). Both sides
decode with a KV cache, in fp32, without stopping early (``eos_token_id=None``), so both
produce exactly ``max_new_tokens`` per prompt; the table says whether the tokens agree.
Calls alternate between the two; medians are shown.

    python bench/generation.py             # tiny and small_100m, batch 1 and 4, 64 new tokens
    python bench/generation.py --quick     # tiny only, < 1 minute (prints only)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

import benchlib
from danube.hf import to_hf
from danube.model import DanubeConfig, build_model
from danube.model.generate import SamplingParams, generate

log = logging.getLogger("bench.generation")

MODELS = {
    "tiny": dict(vocab_size=4096, n_embd=256, intermediate_size=688, n_layer=4, n_head=8, n_kv_head=2,
                 sliding_window=64, max_seq_len=1024),  # conf/model/tiny.yaml
    "small_100m": dict(vocab_size=32_000, n_embd=768, intermediate_size=2048, n_layer=8, n_head=12, n_kv_head=4,
                       sliding_window=4096, max_seq_len=4096),  # as bench/train_throughput.py
}


def prompts_for(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of different lengths (48 to 80 tokens), starting with BOS (1)."""
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (47 + 11 * i % 33,), generator=g).tolist() for i in range(batch)]


def hf_generate(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Left-padded batch, greedy, ``new_tokens`` per row."""
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    # Plain greedy on both sides: the export's generation_config.json would add the report's
    # repetition penalty (1.1) to transformers' defaults.
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0,
                      eos_token_id=None, pad_token_id=0, repetition_penalty=1.0)
    return out[:, t:].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny only, batch 1 and 4, 32 new tokens, 3 repeats")
    benchlib.add_write_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if args.quick:
        args.model, args.new_tokens, args.repeats = ["tiny"], 32, 3
    from transformers import AutoModelForCausalLM

    header = ["model", "batch", "new tokens", "implementation", "ms/call", "tokens/s", "same tokens", "vs transformers"]
    rows, ratios = [], []
    for name in args.model:
        torch.manual_seed(0)
        model = build_model(DanubeConfig(**MODELS[name])).eval()
        with tempfile.TemporaryDirectory() as tmp:
            to_hf(model, Path(tmp) / "hf")
            hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        params = SamplingParams(max_new_tokens=args.new_tokens)
        for batch in args.batch:
            prompts = prompts_for(batch, model.cfg.vocab_size)
            calls = {"danube": lambda: generate(model, prompts, params),
                     "transformers": lambda: hf_generate(hf, prompts, args.new_tokens)}
            outputs = {k: f() for k, f in calls.items()}  # warm-up, and the tokens to compare
            same = sum(a == b for a, b in zip(outputs["danube"], outputs["transformers"]))
            times = {k: [] for k in calls}
            for r in range(args.repeats):
                for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                    times[k].append(benchlib.timed(calls[k]))
            produced = sum(len(o) for o in outputs["danube"])
            ms = {k: benchlib.median(v) * 1e3 for k, v in times.items()}
            ratios.append(ms["transformers"] / ms["danube"])
            for k in calls:
                rows.append([name, batch, args.new_tokens, k, f"{ms[k]:.0f}", f"{produced / ms[k] * 1e3:,.0f}",
                             f"{same}/{batch}", f"{ms['transformers'] / ms[k]:.2f}x"])
    note = ("Randomly initialised fp32 models, greedy, KV cache, "
            f"prompts of 48-80 tokens (left-padded in a batch). Median of {args.repeats} calls per side.\n")
    benchlib.publish("generation_quick" if args.quick else "generation", "Generation", header, rows, note,
                     write=benchlib.should_write(args))
    print(f"ratio_vs_hf={benchlib.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
