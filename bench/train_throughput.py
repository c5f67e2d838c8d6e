"""Training-step throughput: danube's step against transformers' MistralForCausalLM step.

Both sides get the same architecture (``danube.hf.config_to_hf``), the same initial
weights, the same token batch and AdamW with the same hyper-parameters
(``conf/optim/adamw.yaml``), and gradient clipping. The danube side is
:class:`danube.lit.pretrain.PretrainModule` as ``train.py`` builds it: its ``loss``
(chunked, fused cross-entropy), its ``configure_optimizers`` (fused AdamW where the device
has it), its own clipping and its token-keyed learning rate. The transformers side is what
a user of that library writes: ``model(input_ids, labels=...).loss`` and
``torch.optim.AdamW`` with torch's default implementation, in fp32 or bf16 autocast
(transformers has no FP8 training path). ``--compile`` adds a danube side with
``train.compile=true`` (its blocks through ``torch.compile``).

On CPU the sides stay in memory together and their steps alternate (danube, transformers,
transformers, danube, ...) so that a busy machine slows every side alike; the median over
rounds of the per-round ratio is the figure. On CUDA (a machine of its own) each side is
built, timed and freed in turn, so a 1.8B model and transformers' fit one at a time, and
the ratio is of the medians. Lightning's own loop overhead is not included.

CPU (fp32)::

    python bench/train_throughput.py --compile  # tiny and ~100M models, writes BENCHMARKS.md
    python bench/train_throughput.py --quick    # tiny only, < 1 minute, prints only (--write records it)

GPU (``bench/gpu_check.sh`` runs the grid)::

    python bench/train_throughput.py --grid gpu --time-budget 240   # proxy_500m and danube_1p8b, T 2k/4k/16k
    python bench/train_throughput.py --model danube_1p8b --seq-len 2048 --precision bf16 fp8-torchao \\
        --attention sdpa flex --compile
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

import benchlib
from danube.model import DanubeConfig
from danube.precision import PrecisionConfig

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
PRECISIONS = ("fp32", "bf16", "fp8-te", "fp8-torchao")
GPU_MICRO_BATCH_TOKENS = 16_384  # the report's tokens per GPU per forward


@dataclass(frozen=True)
class Spec:
    """One danube configuration to time."""

    precision: str
    attention: str
    compile: bool = False

    @property
    def label(self) -> str:
        return "danube, compiled" if self.compile else "danube"


@dataclass
class Group:
    """The sides timed at one model and sequence length; ``hf`` is transformers' attention (None: no side)."""

    model: str
    seq_len: int
    specs: list[Spec]
    hf: str | None = "sdpa"
    hf_precision: str | None = None  # default: bf16 for GPU precisions, else the first spec's
    hf_at: int = 0  # CUDA: transformers' side runs before specs[hf_at] (len(specs): last)


def gpu_grid(quick: bool) -> list[Group]:
    """What ``--grid gpu`` measures, most important first (a time budget cuts from the end).

    danube_1p8b at each length: bf16 eager with SDPA and with FlexAttention (and flash-attn
    where installed), bf16 with compiled blocks, FP8 (torchao, compiled: it needs the fusions;
    TE where installed), and transformers' bf16 step as the ratio. proxy_500m (the sweep
    model, same head size): the same without the eager kernel comparison. Compiled sides use
    the kernel ``attn_backend=auto`` picks on CUDA (flash-attn if installed, else flex), as
    train.py does. The issue's targets come first in each group; transformers' full-attention
    step at 16,384 last.
    """
    auto = "flash" if importlib.util.find_spec("flash_attn") else "flex"
    te = [Spec("fp8-te", auto)] if importlib.util.find_spec("transformer_engine") else []
    fast = [Spec("bf16", auto, compile=True), Spec("fp8-torchao", auto, compile=True), *te]
    kernels = [Spec("bf16", "sdpa"), Spec("bf16", "flex")] + ([Spec("bf16", "flash")] if auto == "flash" else [])
    if quick:  # the headline side first: a short budget must not cut it
        return [Group("danube_1p8b", 2048, [Spec("fp8-torchao", auto, compile=True), Spec("bf16", "sdpa")], hf_at=2)]
    return [
        Group("danube_1p8b", 2048, [*kernels, *fast]),
        Group("danube_1p8b", 16384, [*fast, *kernels], hf_at=len(fast) + len(kernels)),
        Group("danube_1p8b", 4096, [*fast, *kernels]),
        Group("proxy_500m", 2048, [*fast, Spec("bf16", "sdpa")]),
        Group("proxy_500m", 16384, [*fast, Spec("bf16", auto)]),
        Group("proxy_500m", 4096, [*fast, Spec("bf16", "sdpa")]),
    ]


def model_config(name: str, attention: str) -> DanubeConfig:
    if name == "small_100m":
        values = dict(SMALL_100M)
    else:
        from danube.config import model_preset

        values = model_preset(benchlib.REPO / "conf" / "model" / f"{name}.yaml").to_dict()
    values["attn_backend"] = attention
    return DanubeConfig.from_dict(values)


def precision_config(name: str) -> PrecisionConfig:
    """conf/precision/<name>.yaml; ``fp8-te`` and ``fp8-torchao`` are fp8.yaml with that backend."""
    base, _, backend = name.partition("-")
    values = OmegaConf.to_container(OmegaConf.load(benchlib.REPO / "conf" / "precision" / f"{base}.yaml"))
    if backend:
        values["backend"] = backend
    return PrecisionConfig(**values)


def check_request(args: argparse.Namespace, groups: list[Group]) -> None:
    """Options that cannot run here fail before any model is built, saying why."""
    unknown = sorted({g.model for g in groups} - set(CPU_MODELS) - set(GPU_MODELS))
    if unknown:
        raise SystemExit(f"--model {unknown}: allowed {sorted(CPU_MODELS) + list(GPU_MODELS)}")
    specs = {s for g in groups for s in g.specs}
    for g in groups:
        if g.seq_len > model_config(g.model, "sdpa").max_seq_len:
            raise SystemExit(f"--seq-len {g.seq_len} exceeds {g.model}'s max_seq_len")
    if args.dry_run:
        return
    gpu_only = sorted({f"--model {g.model}" for g in groups if g.model in GPU_MODELS})
    gpu_only += sorted({f"--precision {s.precision}" for s in specs if s.precision != "fp32"})
    gpu_only += sorted({f"--attention {s.attention}" for s in specs if s.attention != "sdpa"})
    if args.device == "cuda":
        gpu_only.append("--device cuda")
    if gpu_only and not torch.cuda.is_available():
        raise SystemExit(f"{', '.join(gpu_only)} need(s) a CUDA GPU and none is visible; "
                         "on CPU run the default models in fp32 with --attention sdpa")
    from danube.precision import check_fp8_available

    for precision in sorted({s.precision for s in specs if s.precision.startswith("fp8")}):
        try:
            check_fp8_available(precision_config(precision))
        except RuntimeError as err:
            raise SystemExit(f"--precision {precision}: {err}") from None
    if any(s.attention == "flash" for s in specs):
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
    objects: list = field(default_factory=list)  # what to drop to free its memory


def danube_side(cfg: DanubeConfig, precision: str, seq_len: int, tokens: torch.Tensor, device: torch.device,
                compile: bool, checkpointing: bool) -> tuple[Side, PretrainModule]:
    """The step ``train.py`` runs; with ``compile`` as under ``train.compile=true``."""
    from danube.lit.pretrain import PretrainModule  # noqa: F811 (Lightning: imported once the request is valid)

    train = OmegaConf.load(benchlib.REPO / "conf" / "train.yaml").train
    optim = OmegaConf.to_container(OmegaConf.load(benchlib.REPO / "conf" / "optim" / "adamw.yaml"))
    module = PretrainModule(
        model=cfg.to_dict(), optim=optim, total_tokens=10 * int(optim["warmup_tokens"]),
        seq_len=seq_len, precision=precision_config(precision),
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

    side = Side("danube, compiled" if compile else "danube", step, params, optimizer, [module])
    return side, module


def hf_side(cfg: DanubeConfig, precision: str, attention: str, tokens: torch.Tensor, device: torch.device,
            checkpointing: bool, fused_adamw: bool, state: dict | None) -> Side:
    """transformers' Mistral/Llama with ``state`` as its weights (None: its own initialisation)."""
    import transformers

    from danube.hf import config_to_hf

    hf_cfg = config_to_hf(cfg)
    with torch.device(device):  # initialised where it runs: 1.8B parameters on a CPU take a while
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=HF_ATTENTION[attention])
    if state is not None:
        hf.load_state_dict(state, strict=True)
    if checkpointing:
        hf.gradient_checkpointing_enable()
    hf.train()
    o = OmegaConf.to_container(OmegaConf.load(benchlib.REPO / "conf" / "optim" / "adamw.yaml"))
    params = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o["weight_decay"]},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], **({"fused": True} if fused_adamw else {}),
    )
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    grad_clip = o.get("grad_clip")
    autocast = autocast_for(precision, device)

    def step() -> torch.Tensor:
        with autocast:
            loss = hf(input_ids=inputs, labels=labels, shift_labels=labels).loss
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Side("transformers", step, params, optimizer, [hf])


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
    ms: float | None  # None: not measured (``status`` says why)
    tokens_per_sec: float | None = None
    mfu: float | None = None
    peak_mb: float | None = None
    loss: float | None = None
    vs_hf: float | None = None  # transformers step time / this step time
    status: str = ""


def group_inputs(args, group: Group) -> tuple[DanubeConfig, int, torch.Tensor]:
    cfg = model_config(group.model, "sdpa")
    gpu = group.model in GPU_MODELS
    micro = args.micro_batch_tokens or (GPU_MICRO_BATCH_TOKENS if gpu else CPU_MODELS[group.model]["micro_batch_tokens"])
    batch = max(1, micro // group.seq_len)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, group.seq_len + 1), generator=gen).to(args.device)
    return cfg, batch, tokens


def hf_precision(group: Group) -> str:
    if group.hf_precision:
        return group.hf_precision
    return "fp32" if all(s.precision == "fp32" for s in group.specs) else "bf16"


def run_alternating(args, group: Group, peak: float | None) -> list[Result]:
    """CPU: every side in memory, steps alternating within each round; ratio = median of per-round ratios."""
    device = torch.device(args.device)
    base, batch, tokens = group_inputs(args, group)
    sides, labels = [], []
    module = None
    for spec in group.specs:
        torch.manual_seed(0)  # same initial weights on every side
        cfg = model_config(group.model, spec.attention)
        side, m = danube_side(cfg, spec.precision, group.seq_len, tokens, device, spec.compile,
                              args.activation_checkpointing)
        module = module or m
        sides.append(side)
        labels.append(spec)
    if group.hf:
        sides.append(hf_side(base, hf_precision(group), group.hf, tokens, device, args.activation_checkpointing,
                             args.hf_fused_adamw, module.model.state_dict()))
        labels.append(None)
    first = [float(s.step()) for s in sides]  # warm-up (and compilation), same weights: same loss
    if all(s is None or s.precision == "fp32" for s in labels) and max(first) - min(first) > 1e-3:
        raise RuntimeError(f"{group.model}: the first-step losses differ ({first}); the sides do not compute the same thing")
    for _ in range(args.warmup - 1):
        for s in sides:
            s.step()
    times: list[list[float]] = [[] for _ in sides]
    order = list(range(len(sides)))
    for r in range(args.repeats):
        for i in (order if r % 2 == 0 else order[::-1]):
            times[i].append(benchlib.timed(sides[i].step, device))
    maybe_profile(args, group, sides, device)
    results = []
    for i, (side, spec) in enumerate(zip(sides, labels)):
        vs_hf = None
        if group.hf:
            vs_hf = 1.0 if spec is None else benchlib.median([h / d for d, h in zip(times[i], times[-1])])
        results.append(result(args, group, batch, spec, side, times[i], first[i], vs_hf, peak,
                              None if args.no_memory else peak_step_bytes(side, device)))
    return results


def run_sequential(args, group: Group, peak: float | None, deadline: float | None) -> list[Result]:
    """CUDA (or --sequential): build, warm up, time and free one side at a time; ratio = transformers'
    median over this one's. Peak memory: the CUDA allocator's over the timed steps (not measured on CPU)."""
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    base, batch, tokens = group_inputs(args, group)
    results: list[Result] = []
    todo: list[Spec | None] = list(group.specs)
    if group.hf:
        todo.insert(group.hf_at, None)  # None: transformers' side
    hf_ms = None
    for spec in todo:
        kind = "compiled" if spec is not None and spec.compile else "eager"
        if args.interrupted:
            results.append(skipped(group, batch, spec, "skipped: interrupted"))
            continue
        if deadline is not None and time.monotonic() + args.estimate[kind] > deadline:
            results.append(skipped(group, batch, spec, "skipped: time budget"))
            continue
        started = time.monotonic()
        side = None
        try:
            torch.manual_seed(0)
            if spec is None:
                # Its own initial weights: step times do not depend on the values, and copying 1.8B
                # parameters between the sides would cost more than the timing.
                side = hf_side(base, hf_precision(group), group.hf, tokens, device, args.activation_checkpointing,
                               args.hf_fused_adamw, None)
            else:
                cfg = model_config(group.model, spec.attention)
                side, _ = danube_side(cfg, spec.precision, group.seq_len, tokens, device, spec.compile,
                                      args.activation_checkpointing)
            first = float(side.step())
            # Compiled blocks: the first step compiles the forward, the backward and their
            # recompiles for a new shape; one more step settles. Eager: one step warms up.
            for _ in range(args.warmup - 1 if kind == "compiled" else 0):
                side.step()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = [benchlib.timed(side.step, device) for _ in range(args.repeats)]
            peak_bytes = torch.cuda.max_memory_allocated() if cuda else None
            maybe_profile(args, group, [side], device)
            if spec is None:
                hf_ms = benchlib.median(times) * 1e3
            results.append(result(args, group, batch, spec, side, times, first, None, peak, peak_bytes))
        except torch.cuda.OutOfMemoryError:
            results.append(skipped(group, batch, spec, "out of memory"))
        except KeyboardInterrupt:  # gpu_check.sh's time limit: keep and write what was measured
            args.interrupted = True
            results.append(skipped(group, batch, spec, "interrupted"))
        except Exception as err:  # one failing cell must not cost the rest of a device run
            log.exception("%s seq %d %s failed", group.model, group.seq_len, spec)
            results.append(skipped(group, batch, spec, f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"))
        finally:
            del side
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        args.estimate[kind] = max(args.estimate[kind], time.monotonic() - started)
    if hf_ms is not None:
        for r in results:
            r.vs_hf = None if r.ms is None else hf_ms / r.ms
    return results


def label_of(spec: Spec | None, group: Group) -> tuple[str, str, str]:
    if spec is None:
        return hf_precision(group), group.hf, "transformers"
    return spec.precision, spec.attention, spec.label


def skipped(group: Group, batch: int, spec: Spec | None, status: str) -> Result:
    precision, attention, side = label_of(spec, group)
    log.warning("%s seq %d %s %s %s: %s", group.model, group.seq_len, precision, attention, side, status)
    return Result(group.model, group.seq_len, batch, precision, attention, side, None, status=status)


def result(args, group: Group, batch: int, spec: Spec | None, side: Side, times: list[float], loss: float,
           vs_hf: float | None, peak: float | None, peak_bytes: int | None) -> Result:
    precision, attention, name = label_of(spec, group)
    ms = benchlib.median(times) * 1e3
    tps = batch * group.seq_len / (ms / 1e3)
    cfg = model_config(group.model, "sdpa")
    mfu = None if peak is None else cfg.flops_per_token(group.seq_len) * tps / peak
    log.info("%s %s %s %s seq %d: %.1f ms/step (runs: %s)", group.model, name, precision, attention, group.seq_len,
             ms, ", ".join(f"{t * 1e3:.0f}" for t in times))
    return Result(group.model, group.seq_len, batch, precision, attention, name, ms, tps, mfu,
                  None if peak_bytes is None else peak_bytes / 2**20, loss, vs_hf)


def maybe_profile(args, group: Group, sides: list[Side], device: torch.device) -> None:
    if not args.profile:
        return
    from torch.profiler import ProfilerActivity, profile

    for s in sides:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
            s.step()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n{group.model} seq {group.seq_len}: {s.name} step, top ops by self time")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile))


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    from danube.tasks.trainer import PEAK_BF16_FLOPS, measured_matmul_flops

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name()
        value = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
        return value, (f"{gpu} dense bf16 peak, {value / 1e12:.0f} TFLOP/s (FP8 rows too)" if value
                       else "unknown GPU: no MFU")
    value = measured_matmul_flops(1024, 1024, m=1024)
    return value, (f"measured fp32 matmul ceiling of this CPU, {value / 1e9:.0f} GFLOP/s (1024^3 matmul, median of 9 "
                   "after warm-up)")


def groups_from_args(args) -> list[Group]:
    if args.grid:
        return gpu_grid(quick=args.grid == "gpu-quick")
    groups = []
    for name in args.model:
        lengths = args.seq_len or [CPU_MODELS[name]["seq_len"] if name in CPU_MODELS else 2048]
        for seq_len, precision, attention in itertools.product(lengths, args.precision, args.attention):
            specs = [Spec(precision, attention)] + ([Spec(precision, attention, compile=True)] if args.compile else [])
            groups.append(Group(name, seq_len, specs, hf=None if args.no_hf else attention))
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, few steps (< 1 min on 2 cores)")
    parser.add_argument("--model", nargs="+", default=None, help=f"{sorted(CPU_MODELS)} (CPU) or {GPU_MODELS} (GPU)")
    parser.add_argument("--seq-len", nargs="+", type=int, default=None, help="default: the model's CPU setting")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="tokens per step (batch = this / seq len)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    parser.add_argument("--attention", nargs="+", default=["sdpa"], choices=list(HF_ATTENTION))
    parser.add_argument("--grid", choices=["gpu", "gpu-quick"], default=None,
                        help="the GPU grid (see gpu_grid); replaces --model/--seq-len/--precision/--attention")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="CUDA: skip the sides that would start after S seconds (listed as skipped)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if visible")
    parser.add_argument("--sequential", action="store_true", help="one side in memory at a time (always on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 10, quick 8, GPU 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (CUDA: eager sides 1)")
    parser.add_argument("--compile", action="store_true", help="add a danube side with train.compile=true")
    parser.add_argument("--activation-checkpointing", action="store_true", help="both sides")
    parser.add_argument("--hf-fused-adamw", action="store_true", help="transformers side with fused AdamW too")
    parser.add_argument("--no-hf", action="store_true", help="danube only (e.g. when both do not fit in memory)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step (CPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N most expensive ops of one step of each side (torch.profiler)")
    parser.add_argument("--benchmarks", type=Path, default=benchlib.BENCHMARKS, help="the file to write the section to")
    benchlib.add_write_flags(parser)
    parser.add_argument("--dry-run", action="store_true", help="check the request and print the sides; time nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.grid:
        args.device = "cuda" if not args.dry_run else args.device
    args.model = args.model or (["tiny"] if args.quick else list(CPU_MODELS))
    args.repeats = args.repeats or (8 if args.quick else 4 if args.device == "cuda" else 10)
    if args.quick:
        args.warmup = 1
    groups = groups_from_args(args)
    check_request(args, groups)
    if args.dry_run:
        for g in groups:  # in the order CUDA runs them
            sides = [f"{s.label} {s.precision} {s.attention}" for s in g.specs]
            if g.hf:
                sides.insert(g.hf_at, f"transformers {hf_precision(g)} {g.hf}")
            print(f"{g.model} seq {g.seq_len}: " + "; ".join(sides))
        print(f"sides={sum(len(g.specs) + bool(g.hf) for g in groups)}")
        return 0
    # Seconds a side is assumed to take before one of its kind has been timed (then: the longest seen).
    args.estimate = {"eager": 10.0, "compiled": 45.0}
    # Every compiled configuration at every shape keeps its own graphs: more than the default 8.
    torch._dynamo.config.recompile_limit = 64
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    peak, peak_note = peak_flops(torch.device(args.device))
    results: list[Result] = []
    args.interrupted = False
    for group in groups:
        if args.device == "cuda" or args.sequential:
            results.extend(run_sequential(args, group, peak, deadline))
        else:
            results.extend(run_alternating(args, group, peak))

    header = ["model", "seq", "batch", "precision", "attention", "step", "ms/step", "tokens/s", "MFU", "peak MB",
              "vs transformers"]
    rows, ratios = [], []
    for r in results:
        if r.ms is None:
            rows.append([r.model, r.seq_len, r.batch, r.precision, r.attention, r.side, r.status, "", "", "", ""])
            continue
        if r.side == "danube" and r.vs_hf is not None:
            ratios.append(r.vs_hf)
        rows.append([r.model, r.seq_len, r.batch, r.precision, r.attention, r.side, f"{r.ms:.1f}",
                     f"{r.tokens_per_sec:,.0f}", "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                     "-" if r.peak_mb is None else f"{r.peak_mb:,.0f}", "" if r.vs_hf is None else f"{r.vs_hf:.2f}x"])
    name = "train_throughput_quick" if args.quick else (
        "train_throughput_gpu" + ("_quick" if args.grid == "gpu-quick" else "") if args.device == "cuda"
        else "train_throughput")
    if args.device == "cuda" or args.sequential:
        timing = (f"ms/step: median of {args.repeats} steps after {args.warmup} warm-up step(s) (compilation "
                  "included in those), one side in memory at a time. *vs transformers*: transformers' median "
                  f"step time ({'bf16' if any(g.hf for g in groups) else '-'} autocast, its default AdamW) over "
                  "this one's (> 1: danube is faster); transformers has no FP8 path, so FP8 rows compare with its "
                  "bf16 step. Peak MB: `torch.cuda.max_memory_allocated` over the timed steps (weights, AdamW "
                  "state, activations).")
    else:
        timing = (f"Peak MB: parameters + optimizer state + the step's own peak allocations (torch profiler). "
                  f"ms/step: median of {args.repeats} rounds after {args.warmup} warm-up step(s); a round is one "
                  "step of each side back to back, in alternating order. *vs transformers*: median over rounds "
                  "of the transformers step time over danube's (> 1: danube is faster).")
    note = (f"MFU against the {peak_note}, at FLOPs per token = 6 x non-embedding parameters + attention over "
            f"the keys each query sees (min(T, window)). {timing} "
            "ratio_vs_hf (last line of the script) is the median of that column over the cases run, "
            "for the uncompiled danube step (the default of `train.compile`).\n")
    title = f"Training step ({'quick, ' if args.quick else ''}{args.device})"
    benchlib.publish(name, title, header, rows, note, write=benchlib.should_write(args), path=args.benchmarks)
    print(f"MFU against: {peak_note}")
    if any(r.mfu is not None and r.mfu > 1 for r in results):
        print("MFU above 100%: the steps ran faster than the ceiling measured at start (the machine was busier "
              "then); the ratio to transformers is unaffected", file=sys.stderr)
    if ratios:
        print(f"ratio_vs_hf={benchlib.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
