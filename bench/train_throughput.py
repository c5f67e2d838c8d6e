"""Training-step throughput: danube's step against transformers' MistralForCausalLM step.

Both sides get the same architecture (``danube.hf.config_to_hf``), the same initial
weights, the same token batch and AdamW with the same hyper-parameters
(``conf/optim/adamw.yaml``), and gradient clipping as Lightning applies it. The danube
side is :class:`danube.lit.pretrain.PretrainModule` as ``train.py`` builds it: its
``loss`` (chunked, fused cross-entropy), its ``configure_optimizers`` (fused AdamW where
the device has it) and its token-keyed learning rate. The transformers side is what a
user of that library writes: ``model(input_ids, labels=...).loss`` and
``torch.optim.AdamW`` with torch's default implementation. ``--compile`` adds a third
side, danube's step with ``train.compile=true`` (its blocks through ``torch.compile``).
Steps alternate (danube, transformers, transformers, danube, ...) so that a busy machine
slows every side alike; the median over rounds of the per-round ratio is the figure.
Lightning's own loop overhead is not included.

CPU (fp32)::

    python bench/train_throughput.py --compile  # tiny and ~100M models, writes BENCHMARKS.md
    python bench/train_throughput.py --quick    # tiny only, < 1 minute; last line ratio_vs_hf=<float>

GPU::

    python bench/train_throughput.py --model proxy_500m danube_1p8b --seq-len 2048 4096 16384 \\
        --precision bf16 fp8 --attention sdpa flex flash
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

import benchlib
from danube.model import DanubeConfig

if TYPE_CHECKING:
    from danube.lit.pretrain import PretrainModule

log = logging.getLogger("bench.train_throughput")

# CPU models: the tiny preset at its recipe's last stage (256 tokens, window 64: the band
# mask path), and a ~100M member of the family with the Llama 2 vocabulary, where the
# 32k-way cross-entropy and the optimizer are a large share of the step.
CPU_MODELS = {
    "tiny": dict(seq_len=256, micro_batch_tokens=2048),
    "small_100m": dict(seq_len=512, micro_batch_tokens=2048),
}
SMALL_100M = dict(vocab_size=32_000, n_embd=768, intermediate_size=2048, n_layer=8, n_head=12, n_kv_head=4,
                  sliding_window=4096, max_seq_len=4096)  # 99,496,704 parameters
GPU_MODELS = ("proxy_500m", "danube_1p8b", "danube2_1p8b")
HF_ATTENTION = {"sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2"}


def model_config(name: str, attention: str) -> DanubeConfig:
    if name == "small_100m":
        values = dict(SMALL_100M)
    else:
        values = OmegaConf.to_container(OmegaConf.load(benchlib.REPO / "conf" / "model" / f"{name}.yaml"))
        values.pop("_target_", None)
    values["attn_backend"] = attention
    return DanubeConfig.from_dict(values)


def precision_config(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(benchlib.REPO / "conf" / "precision" / f"{name}.yaml"))


def check_request(args: argparse.Namespace) -> None:
    """GPU-only options fail here, before any model is built, saying why."""
    gpu_only = [f"--model {m}" for m in args.model if m in GPU_MODELS]
    gpu_only += [f"--precision {p}" for p in args.precision if p != "fp32"]
    gpu_only += [f"--attention {a}" for a in args.attention if a != "sdpa"]
    if args.device == "cuda":
        gpu_only.append("--device cuda")
    if gpu_only and not torch.cuda.is_available():
        raise SystemExit(f"{', '.join(gpu_only)} need(s) a CUDA GPU and none is visible; "
                         "on CPU run the default models in fp32 with --attention sdpa")
    unknown = [m for m in args.model if m not in CPU_MODELS and m not in GPU_MODELS]
    if unknown:
        raise SystemExit(f"--model {unknown}: allowed {sorted(CPU_MODELS) + list(GPU_MODELS)}")
    if "fp8" in args.precision:
        from danube.precision import check_fp8_available

        check_fp8_available()
    if "flash" in args.attention:
        from danube.model.attention import flash_attn_available

        if not flash_attn_available():
            raise SystemExit("--attention flash needs the flash-attn package: pip install -e '.[gpu]'")


@dataclass
class Side:
    """One implementation's step, its parameters and its optimizer."""

    name: str
    step: callable
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer


def danube_side(cfg: DanubeConfig, precision: str, seq_len: int, tokens: torch.Tensor, device: torch.device,
                compile: bool, checkpointing: bool) -> tuple[Side, PretrainModule]:
    """The step ``train.py`` runs; with ``compile`` as under ``train.compile=true``."""
    from danube.lit.pretrain import PretrainModule  # noqa: F811 (Lightning: imported once the request is valid)

    train = OmegaConf.load(benchlib.REPO / "conf" / "train.yaml").train
    optim = OmegaConf.to_container(OmegaConf.load(benchlib.REPO / "conf" / "optim" / "adamw.yaml"))
    module = PretrainModule(
        model=cfg.to_dict(), optim=optim, total_tokens=10 * int(optim["warmup_tokens"]),
        global_batch_tokens=tokens.shape[0] * seq_len, seq_len=seq_len, precision=precision_config(precision),
        loss_chunk_tokens=int(train.loss_chunk_tokens), compile=compile, activation_checkpointing=checkpointing,
    ).to(device)
    module.configure_model()
    module.tokens_seen = int(optim["warmup_tokens"])  # the peak LR: no step is taken at lr 0
    optimizer = module.configure_optimizers()
    params = [p for p in module.model.parameters() if p.requires_grad]
    grad_clip = optim.get("grad_clip")
    autocast = autocast_for(precision, device)

    def step() -> torch.Tensor:
        with autocast:
            loss = module.loss(tokens)
        loss.backward()
        if grad_clip:
            module.clip_grad_norm_(grad_clip)  # what configure_gradient_clipping does in training
        module.tokens_seen += tokens.shape[0] * seq_len
        module.on_before_optimizer_step(optimizer)  # the LR of this step, as in training
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Side("danube, compiled" if compile else "danube", step, params, optimizer), module


def hf_side(cfg: DanubeConfig, module: PretrainModule, precision: str, attention: str, tokens: torch.Tensor,
            device: torch.device, checkpointing: bool, fused_adamw: bool) -> Side:
    import transformers

    from danube.hf import config_to_hf

    hf_cfg = config_to_hf(cfg)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=HF_ATTENTION[attention]).to(device)
    if precision == "fp8":
        hf.init_weights()  # Transformer Engine layers hold other state; timing does not depend on the values
    else:
        hf.load_state_dict(module.model.state_dict(), strict=True)
    if checkpointing:
        hf.gradient_checkpointing_enable()
    hf.train()
    o = module.hparams.optim
    params = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o["weight_decay"]},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=module.lr_now(), betas=tuple(o["betas"]),
        eps=o["eps"], **({"fused": True} if fused_adamw else {}),
    )
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    grad_clip = o.get("grad_clip")
    autocast = autocast_for("bf16" if precision == "fp8" else precision, device)  # no FP8 path in transformers

    def step() -> torch.Tensor:
        with autocast:
            loss = hf(input_ids=inputs, labels=labels, shift_labels=labels).loss
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Side("transformers", step, params, optimizer)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def resident_bytes(side: Side) -> int:
    """Parameters and optimizer state held between steps."""
    state = sum(t.numel() * t.element_size() for s in side.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    return state + sum(p.numel() * p.element_size() for p in side.params)


def peak_step_bytes(side: Side, device: torch.device) -> int:
    """Peak memory of one step: CUDA's allocator peak, or on CPU resident bytes plus the
    peak of the step's own allocations as recorded by the torch profiler."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        side.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    before = resident_bytes(side)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        side.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return before + max(itertools.accumulate(n for _, n in events), default=0)


@dataclass
class Result:
    model: str
    seq_len: int
    batch: int
    precision: str
    attention: str
    side: str
    ms: float
    tokens_per_sec: float
    mfu: float | None
    peak_mb: float | None
    loss: float
    vs_hf: float | None  # median over rounds of (transformers step time / this step time)


def run_case(args, name: str, seq_len: int, precision: str, attention: str, peak: float | None) -> list[Result]:
    device = torch.device(args.device)
    cfg = model_config(name, attention)
    micro = args.micro_batch_tokens or (CPU_MODELS[name]["micro_batch_tokens"] if name in CPU_MODELS else 16_384)
    batch = max(1, micro // seq_len)
    if seq_len > cfg.max_seq_len:
        raise SystemExit(f"--seq-len {seq_len} exceeds {name}'s max_seq_len {cfg.max_seq_len}")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    torch.manual_seed(0)
    danube, module = danube_side(cfg, precision, seq_len, tokens, device, False, args.activation_checkpointing)
    sides = [danube]
    if args.compile:  # same initial weights: the seed is reset before each model is built
        torch.manual_seed(0)
        sides.append(danube_side(cfg, precision, seq_len, tokens, device, True, args.activation_checkpointing)[0])
    if not args.no_hf:
        sides.append(hf_side(cfg, module, precision, attention, tokens, device, args.activation_checkpointing,
                             args.hf_fused_adamw))
    first = {s.name: float(s.step()) for s in sides}  # warm-up (and compilation), same weights: same loss
    if precision == "fp32" and max(first.values()) - min(first.values()) > 1e-3:
        raise RuntimeError(f"{name}: the first-step losses differ ({first}); the steps do not compute the same thing")
    for _ in range(args.warmup - 1):
        for s in sides:
            s.step()
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(args.repeats):
        for s in (sides if r % 2 == 0 else sides[::-1]):
            times[s.name].append(benchlib.timed(s.step, device))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for s in sides:
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
                s.step()
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n{name} seq {seq_len} {precision} {attention}: {s.name} step, top ops by self time")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.profile))
    # Each round times both sides back to back, so the ratio of a round compares like with like;
    # its median over rounds is the figure (robust to another job starting mid-run).
    def ratio(side: str) -> float | None:
        if "transformers" not in times:
            return None
        return 1.0 if side == "transformers" else benchlib.median(
            [h / d for d, h in zip(times[side], times["transformers"])])

    results = []
    for s in sides:
        ms = benchlib.median(times[s.name]) * 1e3
        tps = batch * seq_len / (ms / 1e3)
        mem = None if args.no_memory else peak_step_bytes(s, device) / 2**20
        mfu = None if peak is None else cfg.flops_per_token(seq_len) * tps / peak
        results.append(Result(name, seq_len, batch, precision, attention, s.name, ms, tps, mfu, mem, first[s.name],
                              ratio(s.name)))
        log.info("%s %s seq %d: %.1f ms/step (runs: %s)", name, s.name, seq_len, ms,
                 ", ".join(f"{t * 1e3:.0f}" for t in times[s.name]))
    return results


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    from danube.tasks.common import PEAK_BF16_FLOPS, measured_matmul_flops

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name()
        value = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
        return value, f"{gpu} bf16 dense peak" if value else "unknown GPU: no MFU"
    value = benchlib.median([measured_matmul_flops() for _ in range(3)])
    return value, f"measured fp32 matmul ceiling of this CPU, {value / 1e9:.0f} GFLOP/s (1024^3 matmul)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, few steps (< 1 min on 2 cores)")
    parser.add_argument("--model", nargs="+", default=None, help=f"{sorted(CPU_MODELS)} (CPU) or {GPU_MODELS} (GPU)")
    parser.add_argument("--seq-len", nargs="+", type=int, default=None, help="default: the model's CPU setting")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="tokens per step (batch = this / seq len)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp8"])
    parser.add_argument("--attention", nargs="+", default=["sdpa"], choices=list(HF_ATTENTION))
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if visible")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10, quick 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--compile", action="store_true", help="add a danube side with train.compile=true")
    parser.add_argument("--activation-checkpointing", action="store_true", help="both sides")
    parser.add_argument("--hf-fused-adamw", action="store_true", help="transformers side with fused AdamW too")
    parser.add_argument("--no-hf", action="store_true", help="danube only (e.g. when both do not fit in memory)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N most expensive ops of one step of each side (torch.profiler)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or (["tiny"] if args.quick else list(CPU_MODELS))
    args.repeats = args.repeats or (8 if args.quick else 10)
    if args.quick:
        args.warmup = 1
    check_request(args)
    peak, peak_note = peak_flops(torch.device(args.device))
    results: list[Result] = []
    for name in args.model:
        lengths = args.seq_len or [CPU_MODELS[name]["seq_len"] if name in CPU_MODELS else 2048]
        for seq_len, precision, attention in itertools.product(lengths, args.precision, args.attention):
            results.extend(run_case(args, name, seq_len, precision, attention, peak))

    header = ["model", "seq", "batch", "precision", "attention", "step", "ms/step", "tokens/s", "MFU", "peak MB",
              "vs transformers"]
    rows, ratios = [], []
    for r in results:
        if r.side == "danube" and r.vs_hf is not None:
            ratios.append(r.vs_hf)
        rows.append([r.model, r.seq_len, r.batch, r.precision, r.attention, r.side, f"{r.ms:.1f}",
                     f"{r.tokens_per_sec:,.0f}", "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                     "-" if r.peak_mb is None else f"{r.peak_mb:,.0f}", "" if r.vs_hf is None else f"{r.vs_hf:.2f}x"])
    name = "train_throughput_quick" if args.quick else (
        "train_throughput_gpu" if args.device == "cuda" else "train_throughput")
    note = (f"MFU against the {peak_note}. Peak MB: parameters + optimizer state + the step's own "
            "peak allocations (torch profiler) on CPU; `torch.cuda.max_memory_allocated` on GPU. "
            f"ms/step: median of {args.repeats} rounds after {args.warmup} warm-up step(s); a round is one "
            "step of each side back to back, in alternating order. *vs transformers*: median over rounds "
            "of the transformers step time over danube's (> 1: danube is faster). "
            "ratio_vs_hf (last line of the script) is the median of that column over the cases run, "
            "for the uncompiled danube step (the default of `train.compile`).\n")
    benchlib.publish(name, f"Training step ({'quick, ' if args.quick else ''}{args.device})", header, rows, note,
                     write=not args.no_write)
    print(f"MFU against: {peak_note}")
    if ratios:
        print(f"ratio_vs_hf={benchlib.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
