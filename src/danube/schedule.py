"""Learning-rate schedules and the multi-stage training plan.

Pretraining's schedule is a function of tokens seen, never of steps: stages change the
sequence length (and so the micro-batch) but not the tokens per optimizer step, and the
cosine runs from the first token of the first stage to the last token of the last one.
Fine-tuning, one fixed plan of optimizer steps, runs the same :func:`lr_at` by step.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def lr_at(progress: float, *, lr: float, min_lr: float, warmup: float, total: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` units, then cosine to ``min_lr`` at ``total`` units.

    The one LR schedule: pretraining counts its units in tokens seen, fine-tuning in
    optimizer steps. A step uses the LR at the units consumed *after* it (the tokens
    counting its batch; step k, 0-based, at k + 1), so the first step's LR is not 0 and the
    last one's is ``min_lr``.

    Args:
        progress: units consumed, this step's included.
        lr: the peak, reached at the end of the warm-up.
        min_lr: the floor, reached at ``total`` and kept after it.
        warmup: units of the linear warm-up (0: none).
        total: units at which the cosine reaches ``min_lr``.
    """
    if progress < warmup:
        return lr * progress / warmup
    if progress >= total:
        return min_lr
    fraction = (progress - warmup) / (total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * fraction))


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
    stages: list[dict], *, global_batch_tokens: int, micro_batch_tokens: int, world_size: int
) -> list[StagePlan]:
    """Resolve each stage's micro-batch, accumulation and step count; raise on what cannot divide."""
    if not stages:
        raise ValueError("recipe.stages is empty")
    plans, start = [], 0
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
    lr: float,
    min_lr: float,
    warmup_tokens: int,
    tokens_per_sec: float,
    world_size: int,
    global_batch_tokens: int,
) -> str:
    """The whole schedule as a Markdown table: what a person checks before renting 8 GPUs for weeks."""
    total = plans[-1].end_tokens

    def lr_of(t: int) -> str:
        return f"{lr_at(t, lr=lr, min_lr=min_lr, warmup=warmup_tokens, total=total):.3g}"

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
    foot = (
        f"\n{total:,} tokens in {sum(p.steps for p in plans):,} steps of {global_batch_tokens:,} tokens on "
        f"{world_size} device(s); warm-up {warmup_tokens:,} tokens to {lr:g}, cosine to {min_lr:g}; "
        f"{hours_total:,.1f} h ({hours_total / 24:,.1f} days) at {tokens_per_sec:,.0f} tokens/s."
    )
    return "\n".join([head, *rows]) + foot


def format_mixture(weights: dict[str, float] | None) -> str:
    """``web 84.5%, wiki 5.0%, ...`` (normalised), or ``data.weights`` when the stage sets none."""
    if not weights:
        return "data.weights"
    total = sum(weights.values())
    return ", ".join(f"{name} {100 * w / total:.1f}%" for name, w in weights.items())
