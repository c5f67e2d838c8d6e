"""Learning-rate schedules and the multi-stage training plan.

Pretraining's schedule is a function of tokens seen, never of steps: stages change the
sequence length (and so the micro-batch) but not the tokens per optimizer step, and the
schedule runs from the first token of the first stage to the last token of the last one.
Fine-tuning, one fixed plan of optimizer steps, runs the same :class:`Schedule` by step.

Two shapes: the report's cosine, fixed before the first step, and warmup-stable-decay
(WSD: MiniCPM, SmolLM2/3, OLMo 2's annealing), constant until a final decay, which lets a
cooldown branch from any checkpoint of the constant part (``cooldown.checkpoint``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "sqrt", "cosine")


def decay_factor(fraction: float, shape: str) -> float:
    """How much of ``lr - min_lr`` is left ``fraction`` of the way through a decay: 1 at its start, 0 at its end.

    ``linear``: 1 - f; ``sqrt``: 1 - sqrt(f) (the "1-sqrt" cooldown of Hägele et al., 2024: fast
    at first); ``cosine``: (1 + cos(pi f)) / 2.
    """
    if shape == "linear":
        return 1.0 - fraction
    if shape == "sqrt":
        return 1.0 - math.sqrt(fraction)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * fraction))
    raise ValueError(f"decay shape {shape!r}: expected one of {', '.join(DECAY_SHAPES)}")


@dataclass(frozen=True)
class Schedule:
    """The LR as a function of progress: tokens seen in pretraining, optimizer steps in fine-tuning.

    A step uses the LR at the units consumed *after* it (the tokens counting its batch; step k,
    0-based, at k + 1), so the first step's LR is not 0 and the last one's is ``min_lr``.

    Args:
        lr: the peak, reached at the end of the warm-up.
        min_lr: the floor, reached at ``total`` and kept after it.
        warmup: units of the linear warm-up from 0 (0: none).
        total: units at which the schedule reaches ``min_lr``.
        kind: ``cosine`` (from the warm-up's end to ``total``) or ``wsd`` (constant ``lr``, then
            a decay over the last ``decay`` units).
        decay: ``wsd``: units of the final decay, which ends at ``total``.
        shape: ``wsd``: the decay's shape (:func:`decay_factor`).
    """

    lr: float
    min_lr: float
    warmup: float
    total: float
    kind: str = "cosine"
    decay: float = 0.0
    shape: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule {self.kind!r}: expected one of {', '.join(SCHEDULES)}")
        if self.kind == "wsd" and not 0 < self.decay <= self.total - self.warmup:
            raise ValueError(f"a decay of {self.decay:,} units does not fit between the warm-up's end "
                             f"({self.warmup:,}) and the end ({self.total:,})")
        decay_factor(0.0, self.shape)  # an unknown shape fails here, not at the decay's first step

    @property
    def decay_start(self) -> float:
        """Where the LR starts to fall: the warm-up's end (cosine) or ``total - decay`` (wsd)."""
        return self.warmup if self.kind == "cosine" else self.total - self.decay

    def __call__(self, progress: float) -> float:
        if progress < self.warmup:
            return self.lr * progress / self.warmup
        if progress >= self.total:
            return self.min_lr
        start = self.decay_start
        if progress <= start:
            return self.lr
        fraction = (progress - start) / (self.total - start)
        shape = "cosine" if self.kind == "cosine" else self.shape
        return self.min_lr + (self.lr - self.min_lr) * decay_factor(fraction, shape)

    def describe(self, unit: str = "tokens", start: float = 0) -> str:
        """``warm-up 81,920 tokens to 0.003, constant to 1,048,576, then sqrt decay over 262,144 tokens to 0.0003``.

        ``start``: where the described run begins (a cooldown: its checkpoint's tokens); what
        comes before it is left out.
        """
        if self.kind == "cosine":
            return f"warm-up {self.warmup:,.0f} {unit} to {self.lr:g}, cosine to {self.min_lr:g} at {self.total:,.0f}"
        decay = f"{self.shape} decay over {self.decay:,.0f} {unit} to {self.min_lr:g}"
        if self.decay_start <= start:
            return f"{self.shape} decay from {self.lr:g} over {self.decay:,.0f} {unit} to {self.min_lr:g}"
        return f"warm-up {self.warmup:,.0f} {unit} to {self.lr:g}, constant to {self.decay_start:,.0f}, then {decay}"


def lr_at(progress: float, *, lr: float, min_lr: float, warmup: float, total: float) -> float:
    """The cosine :class:`Schedule` at ``progress``: linear warm-up to ``lr``, cosine to ``min_lr`` at ``total``."""
    return Schedule(lr=lr, min_lr=min_lr, warmup=warmup, total=total)(progress)


@dataclass(frozen=True)
class StagePlan:
    """One stage resolved against the batch settings and the devices."""

    index: int
    name: str
    seq_len: int
    tokens: int
    start_tokens: int
    micro_batch_size: int
    grad_accum: int
    steps: int
    weights: dict[str, float] | None = None  # this stage's data mixture; None: the run's data.weights


    @property
    def end_tokens(self) -> int:
        return self.start_tokens + self.tokens


STAGE_KEYS = {"name", "seq_len", "tokens", "weights"}


def check_weights(weights: dict, where: str) -> None:
    """A data mixture: source name -> number >= 0 (not NaN), with a positive sum."""
    values = list(weights.values()) if isinstance(weights, dict) else []
    if not values or any(not isinstance(w, numbers.Real) or not w >= 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"{where}: weights must map source names to numbers >= 0 with a positive sum, got {weights}")


def check_mixture(weights: dict, sources: list[str] | None, where: str, sources_are: str = "the data sources") -> None:
    """A data mixture for ``sources``: exactly their names (when known), numbers >= 0 with a positive sum.

    The one check of a mixture: ``train.py`` makes it for ``data.weights`` and every stage's
    ``weights`` before any data is read; :class:`danube.data.pretrain.PretrainDataModule`
    for the mixture it is given.
    """
    if sources is not None:
        unknown, missing = sorted(set(weights) - set(sources)), sorted(set(sources) - set(weights))
        if unknown or missing:
            raise ValueError(f"{where} name {sorted(weights)} but {sources_are} are {list(sources)}: unknown: {unknown}, "
                             f"missing: {missing} (a source the stage does not use gets weight 0)")
    check_weights(weights, where)


def plan_stages(
    stages: list[dict], *, global_batch_tokens: int, micro_batch_tokens: int, world_size: int, start_tokens: int = 0
) -> list[StagePlan]:
    """Resolve each stage's micro-batch, accumulation and step count; raise on what cannot divide.

    The first stage starts at ``start_tokens`` (0; a cooldown: the tokens its checkpoint had seen).
    """
    if not stages:
        raise ValueError("recipe.stages is empty")
    plans, start = [], start_tokens
    for i, stage in enumerate(stages):
        unknown = sorted(set(stage) - STAGE_KEYS)
        missing = sorted({"name", "seq_len", "tokens"} - set(stage))
        if unknown or missing:
            raise ValueError(f"recipe.stages[{i}] ({stage.get('name', '?')}): unknown keys {unknown}, missing keys "
                             f"{missing}; a stage has {', '.join(sorted(STAGE_KEYS))}")
        name, seq_len, tokens = stage["name"], int(stage["seq_len"]), int(stage["tokens"])
        where = f"recipe.stages[{i}] ({name})"
        weights = stage.get("weights")
        if weights is not None:
            weights = dict(weights)
            check_weights(weights, where)
        if micro_batch_tokens % seq_len:
            raise ValueError(
                f"{where}: train.micro_batch_tokens={micro_batch_tokens} is not a multiple of seq_len={seq_len}"
            )
        micro = micro_batch_tokens // seq_len
        per_pass = world_size * micro * seq_len
        if global_batch_tokens % per_pass:
            raise ValueError(
                f"{where}: train.global_batch_tokens={global_batch_tokens} is not divisible by "
                f"devices x micro-batch x seq_len = {world_size} x {micro} x {seq_len} = {per_pass}"
                + nearest_geometry(global_batch_tokens, seq_len, micro, world_size)
            )
        steps = tokens // global_batch_tokens
        if steps < 1:
            raise ValueError(f"{where}: tokens={tokens} is less than one step of {global_batch_tokens} tokens")
        plans.append(StagePlan(i, name, seq_len, steps * global_batch_tokens, start, micro,
                               global_batch_tokens // per_pass, steps, weights))
        start += steps * global_batch_tokens
    return plans


def nearest_geometry(global_batch_tokens: int, seq_len: int, micro: int, world_size: int) -> str:
    """What keeps the global batch: the nearest device counts for this micro-batch, the micro-batches for these devices."""
    if global_batch_tokens % seq_len:
        return f"; the global batch is not a whole number of {seq_len}-token sequences"
    samples = global_batch_tokens // seq_len
    devices = [d for d in range(1, samples // micro + 1) if samples % (d * micro) == 0]
    below = [d for d in devices if d < world_size][-1:]
    above = [d for d in devices if d > world_size][:1]
    hints = []
    if below or above:
        hints.append(f"{' or '.join(str(d) for d in below + above)} devices in all (trainer.devices x "
                     "trainer.num_nodes) with this micro-batch")
    if samples % world_size == 0:
        fits = [m for m in range(min(micro, samples // world_size), 0, -1) if (samples // world_size) % m == 0]
        hints.append(f"train.micro_batch_tokens={fits[0] * seq_len} on these {world_size}")
    if not hints:
        return ""
    return f"; to keep the global batch of {samples} sequences: {', or '.join(hints)}"


def format_plan(
    plans: list[StagePlan],
    *,
    schedule: Schedule,
    tokens_per_sec: float,
    world_size: int,
    global_batch_tokens: int,
) -> str:
    """The whole schedule as a Markdown table: what a person checks before renting 8 GPUs for weeks."""
    total = plans[-1].end_tokens

    def lr_of(t: int) -> str:
        return f"{schedule(t):.3g}"

    head = (
        "| stage | seq_len | tokens | start -> end tokens | steps | micro-batch | grad accum | LR first step | "
        "LR last step | hours |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    mixtures = any(p.weights for p in plans)
    if mixtures:
        head = head.replace(" hours |\n", " hours | mixture |\n") + "---|"
    rows, hours_total = [], 0.0
    for p in plans:
        hours = p.tokens / tokens_per_sec / 3600
        hours_total += hours
        rows.append(
            f"| {p.name} | {p.seq_len:,} | {p.tokens:,} | {p.start_tokens:,} -> {p.end_tokens:,} | "
            f"{p.steps:,} | {p.micro_batch_size} | {p.grad_accum} | {lr_of(p.start_tokens + global_batch_tokens)} | "
            f"{lr_of(p.end_tokens)} | {hours:,.1f} |" + (f" {format_mixture(p.weights)} |" if mixtures else "")
        )
    decay = ""
    if schedule.kind == "wsd" and schedule.decay_start > plans[0].start_tokens:
        where = next(p for p in plans if schedule.decay_start < p.end_tokens or p is plans[-1])
        step = math.ceil((schedule.decay_start - where.start_tokens) / global_batch_tokens)
        decay = f" (the decay starts in stage {where.name}, after its step {step:,})"
    foot = (
        f"\n{total - plans[0].start_tokens:,} tokens in {sum(p.steps for p in plans):,} steps of "
        f"{global_batch_tokens:,} tokens on {world_size} device(s); "
        f"{schedule.describe(start=plans[0].start_tokens)}{decay}; "
        f"{hours_total:,.1f} h ({hours_total / 24:,.1f} days) at {tokens_per_sec:,.0f} tokens/s."
    )
    return "\n".join([head, *rows]) + foot


def format_mixture(weights: dict[str, float] | None) -> str:
    """``web 84.5%, wiki 5.0%, ...`` (normalised), or ``data.weights`` when the stage sets none."""
    if not weights:
        return "data.weights"
    total = sum(weights.values())
    return ", ".join(f"{name} {100 * w / total:.1f}%" for name, w in weights.items())
