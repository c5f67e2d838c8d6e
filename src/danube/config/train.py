"""The schema of ``train.py`` (conf/train.yaml and its groups): pretraining in sequence-length or data stages.

Hydra checks every YAML and override against it at composition (an unknown key, a wrong
type); :func:`danube.config.typed` then builds the dataclasses, whose ``__post_init__``
checks ranges and the rules between fields, once, before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import MISSING

from danube.config.common import NumericsConfig, PathsConfig, TrainerConfig
from danube.config.door import with_defaults
from danube.settings import check_ranges, setting, shown
from danube.model.config import DanubeConfig
from danube.precision import PrecisionConfig
from danube.schedule import (DECAY_SHAPES, SCHEDULES, Schedule, StagePlan, check_mixture, check_weights,
                             plan_stages)

DATA_KINDS = ("sample", "sample_sources", "shards")
RESUME_CHOICES = ("auto", "never")


@dataclass
class StageConfig:
    """One stage of a recipe: a sequence length, a token budget and, optionally, its own data mixture."""

    name: str = setting(MISSING, "the stage's folder in the run directory; stage=NAME runs it alone")
    seq_len: int = setting(MISSING, "tokens per sample", min=1)
    tokens: int = setting(MISSING, "the stage's budget, rounded down to whole optimizer steps", min=1)
    # Any, not dict[str, float] | None: OmegaConf cannot merge an override into a null typed dict.
    weights: Any = setting(None, "the stage's mixture (source -> share); null: data.weights")


@dataclass
class RecipeConfig:
    """``recipe`` (conf/recipe/*.yaml): the stages, run back to back; the LR schedule spans them all."""

    stages: list[StageConfig] = setting(doc="the stages in order", factory=list)

    def __post_init__(self) -> None:
        for i, stage in enumerate(self.stages):
            check_ranges(stage, f"recipe.stages[{i}]")
            if stage.weights is not None:
                check_weights(stage.weights, f"recipe.stages[{i}] ({stage.name})")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe.stages: stage names must differ, got {names}")


@dataclass
class DataConfig:
    """``data`` (conf/data/*.yaml): the embedded sample, the sample by source, or shards made by `danube prepare`."""

    kind: str = setting("sample", "the embedded sample, split by source, or shards (yours, from `danube prepare`)",
                        choices=DATA_KINDS)
    sources: Any = setting(None, "shards: a directory, a list of them, or {name: directory}")
    weights: Any = setting(None, "the mixture (source -> share); null: proportional to tokens")  # see StageConfig
    tokenizer: str | None = setting(None, "shards: the SentencePiece model they were made with (checked by checksum)")
    root: str | None = setting(None, "sample: where it is made on first use")
    vocab_size: int | None = setting(None, "sample: pieces of the tokenizer trained on it", min=1)
    num_workers: int = setting(0, "loader processes reading the training batches (0: in the training process)",
                               min=0)
    piece_tokens: int | None = setting(None, "tokens per shuffled piece of a source; null: a power of two giving "
                                             "~4,096 pieces, 4,096 to 1,048,576 (README: the data order)", min=1)
    lanes: int = setting(512, "a source is read through at most this many lanes of its shuffled pieces: the places "
                              "one batch draws from", min=1)
    resume_old_order: bool = setting(False, "resume a run whose checkpoints hold danube 0.1's per-rank data order, "
                                            "going on with the global order from each source's start")

    def __post_init__(self) -> None:
        check_ranges(self, "data")
        if self.weights:
            check_weights(self.weights, "data.weights")


@dataclass
class OptimConfig:
    """``optim`` (conf/optim/adamw.yaml): AdamW and the token-keyed LR schedule over the whole recipe."""

    lr: float = setting(2e-4, "peak learning rate, reached at the end of warm-up", above=0)
    min_lr: float = setting(1e-5, "where the schedule ends, at the recipe's last token", min=0)
    warmup_tokens: int = setting(2_359_296_000, "linear warm-up from 0 over this many tokens", min=0)
    schedule: str = setting("cosine", "cosine (the report's) | wsd: warm-up, constant lr, then a decay to min_lr "
                                      "over the run's last tokens", choices=SCHEDULES)
    decay_fraction: float = setting(0.2, "wsd: the decay's share of the run's tokens (all stages; at most those after "
                                         "the warm-up)", above=0, max=1)
    decay_tokens: int | None = setting(None, "wsd: the decay's length in tokens, instead of decay_fraction", min=1)
    decay_shape: str = setting("linear", "wsd's and cooldowns' decay (sqrt: 1 - sqrt, fast at first)",
                               choices=DECAY_SHAPES)
    betas: list[float] = setting(doc="AdamW's (beta1, beta2), each in [0, 1)", factory=lambda: [0.9, 0.95])
    eps: float = setting(1e-8, "AdamW's epsilon", above=0)
    weight_decay: float = setting(0.1, "on every matrix, never the norms", min=0)
    grad_clip: float | None = setting(1.0, "clip the global gradient norm to this; null: no clipping", above=0)
    fused: Any = setting("auto", "the fused AdamW kernel (auto: where the device has one)",
                         choices=("auto", True, False))

    def __post_init__(self) -> None:
        check_ranges(self, "optim")
        check_betas(self.betas, "optim")
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={shown(self.min_lr)} is above optim.lr={shown(self.lr)}: the schedule "
                             "decays from lr to min_lr")
        if self.schedule == "cosine" and self.decay_tokens is not None:
            raise ValueError(f"optim.decay_tokens={self.decay_tokens} is a setting of optim.schedule=wsd; the cosine "
                             "decays from the warm-up's end to the last token")

    def schedule_over(self, total_tokens: int) -> Schedule:
        """The LR schedule of a run of ``total_tokens`` (all stages); one line naming the keys when it cannot fit."""
        if self.schedule == "cosine":  # a warm-up longer than a (smoke) run just never reaches the peak
            return Schedule(lr=self.lr, min_lr=self.min_lr, warmup=self.warmup_tokens, total=total_tokens)
        if self.warmup_tokens >= total_tokens:
            raise ValueError(f"optim.warmup_tokens={self.warmup_tokens:,} leaves none of the run's {total_tokens:,} "
                             "tokens (all stages) for optim.schedule=wsd's constant part and decay")
        room = total_tokens - self.warmup_tokens
        if self.decay_tokens is not None:
            decay = self.decay_tokens
            if decay > room:
                raise ValueError(f"optim.decay_tokens={decay:,}: the decay is longer than the run's {room:,} tokens "
                                 f"after the warm-up (optim.warmup_tokens={self.warmup_tokens:,} of {total_tokens:,} "
                                 "in all stages)")
        else:  # a share of the whole run, at most what follows the warm-up (1: decay from the warm-up's end)
            decay = min(round(self.decay_fraction * total_tokens), room)
            if decay < 1:
                raise ValueError(f"optim.decay_fraction={shown(self.decay_fraction)} of the run's {total_tokens:,} "
                                 f"tokens (after a warm-up of {self.warmup_tokens:,}) leaves no token to decay over")
        return Schedule(lr=self.lr, min_lr=self.min_lr, warmup=self.warmup_tokens, total=total_tokens, kind="wsd",
                        decay=decay, shape=self.decay_shape)


def check_betas(betas: list[float], section: str) -> None:
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{section}.betas={list(betas)} must be two numbers in [0, 1)")


@dataclass
class LoopConfig(NumericsConfig):
    """``train``: batch geometry, intervals and memory settings of pretraining."""

    global_batch_tokens: int = setting(1_179_648, "tokens per optimizer step, all devices together (report: "
                                                  "~1.18M)", min=1)
    micro_batch_tokens: int = setting(16_384, "tokens per device per forward; micro-batch = this / seq_len", min=1)
    log_every_n_steps: int = setting(5, "train/* scalars every this many optimizer steps", min=1)
    val_every_n_steps: int = setting(50, "val/loss every this many steps (and at each stage's end)", min=1)
    val_batches: int = setting(20, "micro-batches per validation, all devices together; 0: no validation", min=0)
    checkpoint_every_n_steps: int = setting(50, "also at each stage's last step and on SIGTERM/SIGINT; 0: only "
                                                "those", min=0)
    keep_checkpoints: int = setting(1, "step checkpoints kept per stage (the newest; last.ckpt links to it)", min=1)
    max_steps: int | None = setting(None, "stop each stage after this many steps (a smoke test; not complete)", min=1)
    compile: bool = setting(False, "torch.compile each block")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward")
    loss_chunk_tokens: int = setting(4096, "cross-entropy over the vocabulary in chunks of this many tokens", min=1)
    eval_every_n_steps: int | None = setting(None, "lm-eval tasks (eval_tasks) on the model being trained every this "
                                                   "many steps and at each stage's end; null or 0: off", min=0)
    # Any, not list[str]: one name is a list of one, as evaluate.py's tasks.
    eval_tasks: Any = setting(None, "lm-eval task names ([arc_easy,piqa] or one name), built in or in "
                                    "eval_include_path")
    eval_include_path: str | None = setting(None, "folder of extra task YAMLs, as evaluate.py's include_path")
    eval_limit: float | None = setting(None, "at most this many documents per task (below 1: a fraction); null: all",
                                       above=0)
    eval_num_fewshot: int | None = setting(None, "examples in each eval prompt; null: the task's own", min=0)
    eval_batch_size: int = setting(8, "eval sequences per forward", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.eval_tasks, str):
            self.eval_tasks = [self.eval_tasks]
        if self.eval_tasks is not None and (not isinstance(self.eval_tasks, (list, tuple))
                                            or not all(isinstance(t, str) and t for t in self.eval_tasks)):
            raise ValueError(f"train.eval_tasks={self.eval_tasks!r} must be lm-eval task names: [arc_easy,piqa]")
        if self.eval_every_n_steps and not self.eval_tasks:
            raise ValueError(f"train.eval_every_n_steps={self.eval_every_n_steps} needs train.eval_tasks=[TASK,...] "
                             "(lm-eval task names, built in or in train.eval_include_path)")

    @property
    def evaluates(self) -> bool:
        """Whether lm-eval tasks run during training."""
        return bool(self.eval_every_n_steps and self.eval_tasks)


@dataclass
class CooldownConfig:
    """``cooldown``: a decay branched from a checkpoint of a run into its own run directory (README: cooldowns)."""

    checkpoint: str | None = setting(None, "a checkpoint of a run (RUN/STAGE/checkpoints/stepN.ckpt, last.ckpt or "
                                           "final.ckpt): the branch starts from its weights, optimizer, tokens and "
                                           "data position; that run is only read")
    tokens: int | None = setting(None, "the decay's length in tokens, whole optimizer steps of "
                                       "train.global_batch_tokens", min=1)
    shape: str | None = setting(None, "the decay's shape; null: optim.decay_shape", choices=DECAY_SHAPES)

    def __post_init__(self) -> None:
        check_ranges(self, "cooldown")
        if self.checkpoint and self.tokens is None:
            raise ValueError(f"cooldown.checkpoint={self.checkpoint} needs cooldown.tokens=N: the tokens to decay over")
        if self.tokens is not None and not self.checkpoint:
            raise ValueError(f"cooldown.tokens={self.tokens} needs cooldown.checkpoint=PATH: the checkpoint of a run "
                             "to branch from")


@dataclass
class PerfConfig:
    """``perf``: what throughput is measured against."""

    peak_flops: float | None = setting(None, "per-device peak FLOP/s for perf/mfu; null: a table of GPUs, a "
                                             "measured matmul on CPU", above=0)

    def __post_init__(self) -> None:
        check_ranges(self, "perf")


@dataclass
class PretrainConfig:
    """What ``python train.py`` runs: conf/train.yaml with its groups and overrides, checked."""

    model: DanubeConfig = setting(doc="the architecture (conf/model/*.yaml)", factory=DanubeConfig)
    data: DataConfig = setting(doc="the corpus (conf/data/*.yaml)", factory=DataConfig)
    optim: OptimConfig = setting(doc="AdamW and the LR schedule (conf/optim/*.yaml)", factory=OptimConfig)
    recipe: RecipeConfig = setting(doc="the stages (conf/recipe/*.yaml)", factory=RecipeConfig)
    trainer: TrainerConfig = setting(doc="the devices (conf/trainer/*.yaml)", factory=TrainerConfig)
    precision: PrecisionConfig = setting(doc="fp32, bf16 or fp8 (conf/precision/*.yaml)", factory=PrecisionConfig)
    paths: PathsConfig = setting(doc="where data and runs live", factory=PathsConfig)
    train: LoopConfig = setting(doc="batch geometry, intervals, numerics", factory=LoopConfig)
    perf: PerfConfig = setting(doc="throughput accounting", factory=PerfConfig)
    cooldown: CooldownConfig = setting(doc="a decay branched from a run's checkpoint", factory=CooldownConfig)
    name: str | None = setting(None, "names the run directory; default: the model preset's name")
    run_dir: str | None = setting(None, "default: ${paths.runs_dir}/${name}; in a multirun, each job's own folder")
    stage: str = setting("all", "a stage of the recipe, or all: every stage back to back")
    resume: str = setting("auto", "auto: from the run's last checkpoint if any | never | PATH of a .ckpt")
    model_dir: str | None = setting(None, "a danube model directory the first stage starts from (fresh optimizer, "
                                          "tokens 0)")
    init_from: str | None = setting(None, "the old name of model_dir (deprecated: it goes in the next release)")
    seed: int = setting(42, "seeds the weights, the data order and dropout")
    verbose: bool = setting(False, "the libraries' INFO lines too (Lightning, litdata, ...)")
    plan: bool = setting(False, "print the whole schedule (stages, steps, LR, hours) and exit")
    plan_tokens_per_sec: float = setting(292_700, "throughput for the plan's hours (report: 8xH100)", above=0)

    RENAMED: ClassVar[dict[str, str]] = {"init_from": "model_dir"}  # old -> new: the old name warns until removed

    def __post_init__(self) -> None:
        check_ranges(self, "")

    def validate(self) -> list[StagePlan]:
        """The rules between sections (the stages against the batch, the devices, the model and the data); the plans.

        Called at the door after the hardware check, so that a run asking for 8 GPUs on a
        laptop hears that first, not that its batch does not divide over 8.
        """
        plans = self.plans()
        if self.cooldown.checkpoint and self.stage != "all":
            raise ValueError(f"stage={self.stage} with cooldown.checkpoint: a cooldown runs one stage of its own, at "
                             "its checkpoint's sequence length; leave stage unset")
        if self.stage != "all" and self.stage not in [p.name for p in plans]:
            raise ValueError(f"stage={self.stage!r} is not in this recipe; allowed: all, "
                             f"{', '.join(p.name for p in plans)}")
        for p in plans:
            if p.seq_len > self.model.max_seq_len:
                raise ValueError(f"stage {p.name}: seq_len={p.seq_len} exceeds model.max_seq_len="
                                 f"{self.model.max_seq_len}")
        self.optim.schedule_over(plans[-1].end_tokens)  # a decay that cannot fit, in one line
        names = self.source_names()
        mixtures = [("data.weights", self.data.weights)] + [(f"recipe stage {p.name!r} weights", p.weights)
                                                            for p in plans]
        for where, weights in mixtures:
            if weights:
                check_mixture(dict(weights), names, where, f"the data sources (data.kind={self.data.kind})")
        return plans

    def plans(self) -> list[StagePlan]:
        """Each stage resolved against the batch settings and the devices (raises on what cannot divide)."""
        return plan_stages([dataclasses.asdict(s) for s in self.recipe.stages],
                           global_batch_tokens=self.train.global_batch_tokens,
                           micro_batch_tokens=self.train.micro_batch_tokens, world_size=self.trainer.world_size)

    def selected(self) -> list[StagePlan]:
        """The stages this invocation runs (``stage``: one, or all)."""
        return [p for p in self.plans() if self.stage in ("all", p.name)]

    def source_names(self) -> list[str] | None:
        """The data sources' names, read from the config alone (None while they are not given)."""
        if self.data.kind == "sample":
            return ["sample"]
        if self.data.kind == "sample_sources":
            from danube.data.sample import SOURCES

            return list(SOURCES)
        sources = self.data.sources
        if sources is None or sources == MISSING:
            return None
        if isinstance(sources, dict):
            return [str(k) for k in sources]  # names only: paths may still be ??? in a plan
        from danube.data.pretrain import named_sources

        return list(named_sources(sources))


def upgrade_recorded(recorded: dict | None) -> dict | None:
    """A config an earlier release recorded, in today's terms: renamed keys moved, new settings at their defaults."""
    if not recorded:
        return recorded
    recorded = dict(recorded)
    for old, new in PretrainConfig.RENAMED.items():
        if old in recorded:
            recorded.setdefault(new, recorded.pop(old))
    return with_defaults(recorded, PretrainConfig)
