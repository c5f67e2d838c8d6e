"""The parts of the training step that danube does differently, each timed against the alternatives.

* cross-entropy over a 32k vocabulary (``lm_head`` matmul included, forward + backward):
  plain ``F.cross_entropy(F.linear(...))`` (what transformers does), the previous chunked
  loss that recomputed each chunk's logits in the backward pass (activation checkpointing),
  and danube's chunked loss with gradients formed in the forward pass;
* AdamW over ~100M parameters (``--device cuda``: danube_1p8b's 1.8B): torch's default
  (per-tensor loop on CPU, foreach on CUDA), ``foreach``, ``fused``, and the last two after
  clipping the global gradient norm (``clip_grad_norm_``), as the training step does: danube
  clips itself, so the fused kernel is usable under bf16-mixed;
* sliding-window attention with T > window through SDPA: the window as a full (T, T)
  mask, 3-D (SDPA's math path on CPU) and 4-D (its fused kernel), against danube's query
  blocks (``windowed_sdpa``) at several block sizes.

Variants of one part alternate within each round; the table shows medians.

    python bench/step_parts.py                # writes its section of BENCHMARKS.md
    python bench/step_parts.py --quick        # smaller shapes, fewer rounds (prints only)
    python bench/step_parts.py --device cuda  # AdamW with and without clipping at 1.8B parameters
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import benchlib
from danube.losses import chunked_cross_entropy
from danube.model.attention import query_block, windowed_sdpa


def _ce_sum(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum", ignore_index=-100)


def ce_variants(tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (1, tokens), generator=g)

    def plain():
        F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten()).backward()

    def recompute():  # the loss before this change: checkpointed chunks
        hh, tt = h.flatten(0, 1), t.flatten()
        total = sum(checkpoint(_ce_sum, a, w, b, use_reentrant=False) for a, b in zip(hh.split(chunk), tt.split(chunk)))
        (total / tt.numel()).backward()

    def fused():
        chunked_cross_entropy(h, w, t, chunk).backward()

    def run(fn):
        def call():
            h.grad = w.grad = None
            fn()
        return call

    return {"plain (transformers)": run(plain), f"chunks of {chunk}, recomputed": run(recompute),
            f"chunks of {chunk}, gradients in forward (danube)": run(fused)}


def cpu_adamw_shapes(n_params: int) -> list[tuple[int, ...]]:
    """~n_params in a 32k-vocabulary model's shapes: two (32000, 768) tables and (2048, 768) matrices."""
    rows = 2048
    shapes = [(32_000, 768)] * 2
    left = n_params - sum(a * b for a, b in shapes)
    return shapes + [(rows, 768)] * max(1, left // (rows * 768))


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Every parameter's shape in a conf/model preset (built on the meta device: no memory)."""
    from danube.config import model_preset
    from danube.model import build_model

    preset = benchlib.REPO / "conf" / "model" / f"{name}.yaml"
    return [tuple(p.shape) for p in build_model(model_preset(preset), device="meta").parameters()]


def adamw_variants(shapes: list[tuple[int, ...]], device: str = "cpu") -> dict:
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kw = dict(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1)
    opts = {"default (transformers side)": torch.optim.AdamW(params, **kw),
            "foreach": torch.optim.AdamW(params, foreach=True, **kw),
            "fused": torch.optim.AdamW(params, fused=True, **kw)}
    variants = {k: o.step for k, o in opts.items()}

    def clipped(opt):
        def call():
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # the gradients' norm stays ~1 after the first call
            opt.step()
        return call

    variants["clip + foreach"] = clipped(torch.optim.AdamW(params, foreach=True, **kw))
    variants["clip + fused (danube)"] = clipped(torch.optim.AdamW(params, fused=True, **kw))
    return variants


def attention_variants(batch: int, heads: int, kv_heads: int, t: int, d: int, window: int) -> dict:
    """SDPA with the window as a full (T, T) mask, against query blocks of several sizes."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, t, d, generator=g).requires_grad_()
    k = torch.randn(batch, kv_heads, t, d, generator=g).requires_grad_()
    v = torch.randn(batch, kv_heads, t, d, generator=g).requires_grad_()
    pos = torch.arange(t)
    diff = pos[:, None] - pos[None]
    allowed = (diff >= 0) & (diff < window)

    def run(fn):
        def call():
            q.grad = k.grad = v.grad = None
            fn().sum().backward()
        return call

    variants = {
        "3-D bool mask (first version)": run(lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[None], enable_gqa=True)),
        "4-D bool mask (before)": run(lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[None, None], enable_gqa=True)),
    }
    chosen = query_block(window)
    for block in sorted({16, 32, 64, 128, chosen}):
        label = f"query blocks of {block}" + (" (danube)" if block == chosen else "")
        variants[label] = run(lambda block=block: windowed_sdpa(q, k, v, window, block))
    return variants


def measure(variants: dict, rounds: int, device: str = "cpu") -> dict[str, float]:
    names = list(variants)
    for fn in variants.values():
        fn()  # warm-up
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(benchlib.timed(variants[n], device))
    return {n: benchlib.median(v) * 1e3 for n, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the AdamW part only, at --adamw-model's parameter shapes")
    parser.add_argument("--adamw-model", default=None, help="a conf/model preset (default: ~100M on CPU, "
                        "danube_1p8b on CUDA)")
    parser.add_argument("--benchmarks", type=Path, default=benchlib.BENCHMARKS, help="the file to write the section to")
    benchlib.add_write_flags(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the parts and their sizes; time nothing")
    parser.add_argument("--parts", nargs="+", choices=["ce", "adamw", "attention"], default=None,
                        help="a subset (its own section, step_parts_<parts>); default all (CPU), adamw (CUDA)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("--device cuda needs a CUDA GPU and none is visible")
    if args.quick:
        args.rounds = 3
    scale = 4 if args.quick else 1
    if args.adamw_model or args.device == "cuda":
        name = args.adamw_model or "danube_1p8b"
        shapes = model_shapes(name)
        adamw = (f"AdamW step, {name} ({sum(torch.Size(s).numel() for s in shapes) / 1e9:.2f}B parameters)", shapes)
    else:
        adamw = (f"AdamW step, ~{100 // scale}M parameters", cpu_adamw_shapes(100_000_000 // scale))
    if args.dry_run:
        print(f"{adamw[0]}: {len(adamw[1])} tensors on {args.device}")
        return 0
    chosen = args.parts or (["ce", "adamw", "attention"] if args.device == "cpu" else ["adamw"])
    if args.device == "cuda" and chosen != ["adamw"]:
        raise SystemExit("--device cuda times the AdamW part only: --parts adamw")
    parts = [
        ("ce", f"cross-entropy, {4096 // scale:,} tokens x 768 -> 32,000",
         lambda: ce_variants(4096 // scale, 768, 32_000, 1024 // scale)),
        ("adamw", adamw[0], lambda: adamw_variants(adamw[1], args.device)),
        ("attention", "attention fwd+bwd, 8x8 heads (2 KV), T 256, window 64 (tiny)",
         lambda: attention_variants(8, 8, 2, 256, 32, 64)),
        ("attention", f"attention fwd+bwd, 1x16 heads (4 KV) x 64, T {2048 // scale}, window {512 // scale}",
         lambda: attention_variants(1, 16, 4, 2048 // scale, 64, 512 // scale)),
    ]
    parts = [(label, build) for key, label, build in parts if key in chosen]
    header = ["part", "variant", "ms", "vs first"]
    rows = []
    for part, build in parts:
        ms = measure(build(), args.rounds, args.device)  # built one part at a time: 1.8B x 5 AdamW states on CUDA
        first = next(iter(ms.values()))
        for name, value in ms.items():
            rows.append([part, name, f"{value:.1f}", f"{first / value:.2f}x"])
        if args.device == "cuda":
            torch.cuda.empty_cache()
    note = (f"fp32, {args.device.upper()}. Median of {args.rounds} rounds; "
            "*vs first*: the first variant's time over this one's (> 1: faster). *clip*: "
            "`torch.nn.utils.clip_grad_norm_(params, 1.0)` before the step (foreach norms on CUDA), as "
            "`PretrainModule.clip_grad_norm_` does.\n")
    section = "step_parts_quick" if args.quick else ("step_parts_gpu" if args.device == "cuda" else "step_parts")
    if args.device == "cpu" and args.parts and sorted(set(args.parts)) != ["adamw", "attention", "ce"]:
        section += "_" + "_".join(p for p in ("ce", "adamw", "attention") if p in args.parts)
    title = "AdamW with and without clipping" if chosen == ["adamw"] else "Parts of the training step"
    benchlib.publish(section, f"{title} ({args.device})", header, rows, note,
                     write=benchlib.should_write(args), path=args.benchmarks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
