"""Pretraining: one or all stages of a recipe, resumable after any kill, with everything under ``run_dir``.

Run directory layout::

    run_dir/
      .lock                           # held by the one process writing here
      config.yaml                     # the resolved config of the newest invocation
      history/NNNN-<time>.yaml        # every invocation's config, command line and changes
      tensorboard/<stage>/            # scalars with tokens seen as the x-axis
      <stage>/checkpoints/stepN.ckpt  # at optimizer-step boundaries; last.ckpt links to the newest
      <stage>/final.ckpt              # the stage's end: what the next stage starts from
      <stage>/model/                  # the stage's weights as a danube model directory
      <stage>/complete.json           # written last: the stage is complete

A stage may set its own data mixture (``weights: {source: share}`` in the recipe; default
``data.weights``), and the first stage may start from a model directory's weights
(``model_dir``: fresh optimizer, tokens 0) as H2O-Danube2 started from H2O-Danube-1.8B.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from danube import logs, rundir
from danube.callbacks import StepBoundary, mean_validation_loss
from danube.checkpoints import check_checkpoint, load_checkpoint, newest_intact
from danube.data.tokenizer import Tokenizer
from danube.files import atomic_write_text, remove_stale_temps
from danube.model import DanubeConfig
from danube.model.attention import check_backend_available
from danube.model.io import check_model_dir, check_state_dict, is_model_dir, read_config, save_model_dir, tokenizer_path
from danube.schedule import StagePlan, check_mixture, format_mixture, format_plan, plan_stages
from danube.tasks.common import (build_trainer, check_numerics, check_trainer_config, current_names, current_recorded,
                                 danube_config, hydra_mode_is_multirun, peak_flops, pin_numerics, resolve_run_dir,
                                 world_size)

log = logging.getLogger(__name__)

RESUME_CHOICES = ("auto", "never")
COMPLETE_FILE = "complete.json"
FINAL_CKPT = "final.ckpt"

# What a run directory's recorded config is compared on (see danube.rundir.check_changes).
IDENTITY_KEYS = ("model", "data", "recipe", "seed", "model_dir", "train.global_batch_tokens",
                 "train.micro_batch_tokens", "trainer.devices", "trainer.num_nodes")
COSMETIC_KEYS = ("model.attn_backend", "data.num_workers", "data.root", "train.log_every_n_steps",
                 "train.val_every_n_steps", "train.val_batches", "train.checkpoint_every_n_steps",
                 "train.keep_checkpoints", "train.compile", "train.activation_checkpointing",
                 "train.loss_chunk_tokens", "train.max_steps", "perf", "verbose")
# model._target_: recorded by runs made before the model presets lost it (nothing ever instantiated it).
IGNORED_KEYS = ("name", "run_dir", "stage", "resume", "plan", "plan_tokens_per_sec", "paths", "model._target_")

# Keys renamed in this release (old -> new): the old names work, with a warning, until the next.
RENAMED = {"init_from": "model_dir"}

# The keys each section may have: a misspelt one (`+train.lrr=1`) is an error, not ignored.
TRAIN_KEYS = {"global_batch_tokens", "micro_batch_tokens", "log_every_n_steps", "val_every_n_steps", "val_batches",
              "checkpoint_every_n_steps", "keep_checkpoints", "max_steps", "compile", "activation_checkpointing",
              "loss_chunk_tokens", "deterministic", "threads"}
OPTIM_KEYS = {"lr", "min_lr", "warmup_tokens", "betas", "eps", "weight_decay", "grad_clip", "fused"}
TOP_KEYS = {"model", "data", "optim", "recipe", "stage", "trainer", "precision", "paths", "name", "run_dir", "resume",
            "model_dir", "seed", "plan", "plan_tokens_per_sec", "train", "perf", "verbose"}


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    tokens_seen: int
    final_train_loss: float | None
    final_val_loss: float | None
    complete: bool = True  # False: stopped early at train.max_steps
    trained_now: int = 0  # tokens this invocation trained (0: the stage was already complete)


def stage_plans(cfg: DictConfig) -> list[StagePlan]:
    return plan_stages(
        OmegaConf.to_container(cfg.recipe.stages, resolve=True),
        global_batch_tokens=int(cfg.train.global_batch_tokens),
        micro_batch_tokens=int(cfg.train.micro_batch_tokens),
        world_size=world_size(cfg.trainer),
    )


def selected_stages(cfg: DictConfig, plans: list[StagePlan]) -> list[StagePlan]:
    if cfg.stage == "all":
        return plans
    names = [p.name for p in plans]
    if cfg.stage not in names:
        raise ValueError(f"stage={cfg.stage!r} is not in this recipe; allowed: all, {', '.join(names)}")
    return [plans[names.index(cfg.stage)]]


def model_config(cfg: DictConfig) -> DanubeConfig:
    """The model section as a DanubeConfig; its validation errors name the ``model`` group."""
    return danube_config(cfg.model, f"model (conf/model/{model_choice(cfg)}.yaml + overrides)")


def model_choice(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("model", "?") if HydraConfig.initialized() else "?"


def _check_keys(section, allowed: set[str], where: str) -> None:
    unknown = sorted(set(section.keys()) - allowed)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
                         f"{where.rstrip('.') or 'the top level'} has {', '.join(sorted(allowed))}")


def _number(cfg_section, key: str, where: str, *, integer: bool = False, minimum: float | None = None,
            above: float | None = None, optional: bool = False):
    value = cfg_section.get(key)
    if value is None and optional:
        return None
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise ValueError(f"{where}{key}={value!r} must be {'an integer' if integer else 'a finite number'}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}{key}={value!r} must be >= {minimum}")
    if above is not None and value <= above:
        raise ValueError(f"{where}{key}={value!r} must be > {above}")
    return value


def check_values(cfg: DictConfig) -> None:
    """Names and ranges of the train and optim settings: a typo or a negative LR fails here, not at step 1000."""
    _check_keys(cfg, TOP_KEYS, "")
    _check_keys(cfg.train, TRAIN_KEYS, "train.")
    _check_keys(cfg.optim, OPTIM_KEYS, "optim.")
    t, o = cfg.train, cfg.optim
    for key in ("global_batch_tokens", "micro_batch_tokens", "log_every_n_steps", "val_every_n_steps",
                "keep_checkpoints", "loss_chunk_tokens"):
        _number(t, key, "train.", integer=True, minimum=1)
    _number(t, "checkpoint_every_n_steps", "train.", integer=True, minimum=0)
    _number(t, "val_batches", "train.", integer=True, minimum=0, optional=True)
    _number(t, "max_steps", "train.", integer=True, minimum=1, optional=True)
    check_numerics(cfg)
    lr = _number(o, "lr", "optim.", above=0)
    min_lr = _number(o, "min_lr", "optim.", minimum=0)
    if min_lr > lr:
        raise ValueError(f"optim.min_lr={min_lr} is above optim.lr={lr}: the cosine decays from lr to min_lr")
    _number(o, "warmup_tokens", "optim.", integer=True, minimum=0)
    _number(o, "eps", "optim.", above=0)
    _number(o, "weight_decay", "optim.", minimum=0)
    _number(o, "grad_clip", "optim.", above=0, optional=True)
    betas = list(o.betas) if o.get("betas") is not None else []
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"optim.betas={betas} must be two numbers in [0, 1)")
    if o.get("fused", "auto") not in ("auto", True, False):
        raise ValueError(f"optim.fused={o.fused!r}; allowed: auto, true, false")


def check_multirun_job(cfg: DictConfig) -> None:
    """In a multirun (a sweep), refuse the settings that would make jobs share or break their runs."""
    if not hydra_mode_is_multirun():
        return
    if cfg.get("run_dir"):
        raise ValueError(
            f"run_dir={cfg.run_dir} in a multirun: every job would write (and resume) the same directory. "
            "Leave run_dir unset, each job then runs in hydra.sweep.dir/<job number>; move the sweep with "
            "hydra.sweep.dir=PATH"
        )
    if world_size(cfg.trainer) > 1:
        raise ValueError(
            f"trainer has {world_size(cfg.trainer)} devices in a multirun: Lightning starts one process per extra "
            "device by re-running this command line, -m included, so each would start the whole sweep. "
            "Sweep with one device per job (trainer=h100x1); for several GPUs run one sweep per GPU "
            "(CUDA_VISIBLE_DEVICES, each with its own hydra.sweep.dir)"
        )


def validate(cfg: DictConfig) -> list[StagePlan]:
    """Every check that can fail, before any data is read or any weight is built; returns the stage plans."""
    return checked(cfg)[0]


def checked(cfg: DictConfig) -> tuple[list[StagePlan], DanubeConfig]:
    """:func:`validate`'s checks; returns the stage plans and the run's one DanubeConfig."""
    cfg = current_names(cfg, RENAMED, "train.py")
    check_multirun_job(cfg)
    if not cfg.plan:  # a plan for 8 GPUs can be printed anywhere; a run needs its hardware first
        check_trainer_config(cfg.trainer, cfg.precision)
        check_backend_available(str(cfg.model.get("attn_backend", "auto")), str(cfg.trainer.accelerator))
    check_values(cfg)
    resume = str(cfg.resume)
    if resume not in RESUME_CHOICES and not Path(resume).is_file():
        raise ValueError(f"resume={resume!r}: expected auto, never, or the path of an existing .ckpt file")
    model_cfg = model_config(cfg)
    plans = stage_plans(cfg)
    selected_stages(cfg, plans)
    for p in plans:
        if p.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"stage {p.name}: seq_len={p.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    check_mixtures(cfg, plans)
    if not cfg.plan and cfg.get("model_dir"):
        check_start_model(Path(cfg.model_dir), model_cfg)
    return plans, model_cfg


DATA_KINDS = ("sample", "sample_sources", "shards")


def data_kind(cfg: DictConfig) -> str:
    """``data.kind``: the embedded sample, the sample split by source, or prepared shards."""
    kind = cfg.data.kind
    if kind not in DATA_KINDS:
        raise ValueError(f"data.kind={kind!r}; allowed: {', '.join(DATA_KINDS)}")
    return kind


def source_names(cfg: DictConfig) -> list[str] | None:
    """The data sources' names, read from the config alone (None if they are not given yet)."""
    data = cfg.data
    kind = data_kind(cfg)
    if kind == "sample":
        return ["sample"]
    if kind == "sample_sources":
        from danube.data.sample import SOURCES

        return list(SOURCES)
    if OmegaConf.is_missing(data, "sources") or data.sources is None:
        return None
    if OmegaConf.is_dict(data.sources):
        return [str(k) for k in data.sources.keys()]  # keys only: paths may still be ??? in a plan
    return list(_named_dirs(_plain(data.sources)))


def _plain(value):
    """A config node as plain Python (a single directory is a plain string already)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _named_dirs(sources: str | list[str]) -> dict[str, str]:
    """A directory or a list of them, named after their last path component (as PretrainDataModule does)."""
    from danube.data.pretrain import named_sources

    return {name: str(d) for name, d in named_sources(sources).items()}


def check_mixtures(cfg: DictConfig, plans: list[StagePlan]) -> None:
    """``data.weights`` and every stage's ``weights`` must name exactly the data sources."""
    names = source_names(cfg)
    mixtures = [("data.weights", cfg.data.get("weights"))]
    mixtures += [(f"recipe stage {p.name!r} weights", p.weights) for p in plans]
    for where, weights in mixtures:
        if weights:
            check_mixture(dict(weights), names, where, f"the data sources (data={data_choice(cfg)})")


def data_choice(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("data", "?") if HydraConfig.initialized() else str(cfg.data.kind)


def check_start_model(path: Path, model_cfg: DanubeConfig) -> None:
    """``model_dir`` must be a model directory whose tensors have the configured model's shapes.

    Only the safetensors header is read: a 1.8B directory is checked in milliseconds.
    """
    from safetensors import SafetensorError, safe_open

    from danube.model import build_model
    from danube.model.io import WEIGHTS_FILE, CorruptFileError

    check_model_dir(path, "model_dir", hf=False)
    if tokenizer_path(path) is None:
        raise FileNotFoundError(
            f"model_dir={path} has no tokenizer.model: the run cannot check that its data uses the model's tokenizer"
        )
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CorruptFileError(f"corrupt file {path / WEIGHTS_FILE}: not a readable safetensors file ({err})") from err
    check_state_dict(build_model(model_cfg, device="meta"), shapes, f"model_dir={path}")


def check_start_tokenizer(path: Path, tokenizer: Tokenizer) -> None:
    """The data must be tokenized with the model directory's tokenizer (after `danube swap-tokenizer`)."""
    theirs = Tokenizer(tokenizer_path(path))
    if theirs.checksum != tokenizer.checksum:
        raise ValueError(
            f"model_dir={path} was trained with the tokenizer {theirs.model_file} (sha256 {theirs.checksum[:12]}...) "
            f"but this run's data uses {tokenizer.model_file} (sha256 {tokenizer.checksum[:12]}...): run "
            f"`danube swap-tokenizer {path} {tokenizer.model_file} NEW_DIR` and start from NEW_DIR"
        )


def prepare_data(cfg: DictConfig) -> tuple[dict[str, str], dict[str, float] | None, Tokenizer]:
    """Sources, weights and tokenizer; the embedded sample is built on first use."""
    data = cfg.data
    weights = OmegaConf.to_container(data.weights, resolve=True) if data.get("weights") else None
    kind = data_kind(cfg)
    if kind == "sample":
        from danube.data.sample import ensure_sample_data

        tok_path, shard_dir = ensure_sample_data(data.root, vocab_size=int(data.vocab_size))
        return {"sample": str(shard_dir)}, weights, Tokenizer(tok_path)
    if kind == "sample_sources":
        from danube.data.sample import ensure_sample_sources

        tok_path, dirs = ensure_sample_sources(data.root, vocab_size=int(data.vocab_size))
        return {name: str(d) for name, d in dirs.items()}, weights, Tokenizer(tok_path)
    sources = _plain(data.sources)
    if not isinstance(sources, dict):
        sources = _named_dirs(sources)
    return sources, weights, Tokenizer(data.tokenizer)


# -- stages in a run directory ----------------------------------------------------------------
def read_complete(stage_dir: Path) -> dict | None:
    """A stage's completion record, if the stage is complete (record written, model directory in place)."""
    record = stage_dir / COMPLETE_FILE
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except json.JSONDecodeError as err:
        log.warning("%s is not valid JSON (%s): the stage is treated as unfinished", record, err)
        return None
    if not isinstance(data, dict) or not is_model_dir(stage_dir / "model"):
        return None
    return data


def write_complete(stage_dir: Path, result: TrainResult, plan: StagePlan) -> None:
    atomic_write_text(stage_dir / COMPLETE_FILE, json.dumps({
        "stage": plan.name, "tokens_seen": result.tokens_seen, "steps": plan.steps,
        "final_train_loss": result.final_train_loss, "final_val_loss": result.final_val_loss,
        "model_dir": "model", "checkpoint": FINAL_CKPT,
    }, indent=2) + "\n")


def model_from_checkpoint(ckpt: dict):
    """The Danube model held by a pretraining checkpoint (TE's ``_extra_state`` dropped)."""
    from danube.model import build_model
    from danube.model.io import load_weights

    cfg = DanubeConfig.from_dict(ckpt["danube"]["model_config"])
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if not k.endswith("._extra_state")}
    return load_weights(build_model(cfg, device="meta"), state, "checkpoint")


def finish_from_final(stage_dir: Path, plan: StagePlan, tokenizer: Tokenizer, run_dir: Path) -> dict | None:
    """Complete a stage whose ``final.ckpt`` is written: its model directory (if missing) and its record.

    This is where a stage killed between its final checkpoint and its record resumes.
    Returns the record, or None when there is no intact final checkpoint at the stage's end.
    """
    final = stage_dir / FINAL_CKPT
    if not final.is_file():
        return None
    problem = check_checkpoint(final)
    if problem:
        aside = final.with_name(final.name + ".corrupt")
        os.replace(final, aside)
        log.warning("%s is damaged (%s): moved to %s; stage %s resumes from its step checkpoints", final, problem,
                    aside.name, plan.name)
        return None
    ckpt = load_checkpoint(final, mmap=True)
    tokens = int(ckpt["danube"]["tokens_seen"])
    if tokens != plan.end_tokens:
        return None
    if not is_model_dir(stage_dir / "model"):
        save_model_dir(model_from_checkpoint(ckpt), stage_dir / "model", tokenizer=tokenizer.model_file)
    train, val = logged_losses(run_dir, plan)
    write_complete(stage_dir, TrainResult(run_dir, stage_dir / "model", tokens, train, val), plan)
    return read_complete(stage_dir)


def logged_losses(run_dir: Path, plan: StagePlan) -> tuple[float | None, float | None]:
    """(last train loss, last val loss) logged within the stage's token range."""
    from danube.plot import read_scalars

    try:
        scalars = read_scalars(run_dir)
    except FileNotFoundError:
        return None, None
    last = [next((v for t, v in reversed(scalars.get(tag, [])) if plan.start_tokens < t <= plan.end_tokens), None)
            for tag in ("train/loss", "val/loss")]
    return last[0], last[1]


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at (memory-mapped: nothing but the header is read)."""
    return int(load_checkpoint(path, mmap=True)["global_step"])


def stage_start(cfg: DictConfig, plan: StagePlan, plans: list[StagePlan], run_dir: Path) -> tuple[str | None, str | None]:
    """(ckpt_path to resume this stage from, what to start from: the previous stage's final checkpoint or model_dir)."""
    resume = str(cfg.resume)
    if resume not in RESUME_CHOICES and resume_stage(cfg, plans) == plan.name:
        return resume, None
    if resume == "auto":
        found = newest_intact(run_dir / plan.name / "checkpoints")
        if found is not None:
            return str(found[1]), None
    if plan.index == 0:
        return None, (str(cfg.model_dir) if cfg.get("model_dir") else None)
    prev = plans[plan.index - 1]
    final = run_dir / prev.name / FINAL_CKPT
    if not final.is_file():
        raise FileNotFoundError(
            f"stage {plan.name} starts from stage {prev.name}'s final checkpoint, {final}, which does not exist: "
            f"run stage={prev.name} first (same run_dir), or stage=all"
        )
    problem = check_checkpoint(final)
    if problem:
        raise ValueError(
            f"corrupt file {final} ({problem}): stage {plan.name} cannot start from it. Move it and "
            f"{run_dir / prev.name / COMPLETE_FILE} away and run stage={prev.name} again: it resumes from its newest "
            "intact step checkpoint, if one is left"
        )
    load_checkpoint(final, mmap=True)  # refuses anything but tensors and plain values, before any set-up
    return None, str(final)


def resume_stage(cfg: DictConfig, plans: list[StagePlan]) -> str:
    """The stage a ``resume=PATH`` checkpoint belongs to (read from the checkpoint, memory-mapped)."""
    path = Path(str(cfg.resume))
    problem = check_checkpoint(path)
    if problem:
        raise ValueError(f"resume={path}: {problem}")
    ckpt = load_checkpoint(path, mmap=True)
    info = ckpt.get("danube") if isinstance(ckpt, dict) else None
    if not info:
        raise ValueError(f"resume={path} is not a danube pretraining checkpoint (no 'danube' entry)")
    name = info.get("stage")
    if name is None:  # checkpoints before stage names were recorded: the stage with that sequence length
        names = [p.name for p in plans if p.seq_len == info.get("seq_len")]
        name = names[0] if len(names) == 1 else None
    if name not in [p.name for p in plans]:
        raise ValueError(f"resume={path} belongs to stage {name!r}, which is not in this recipe "
                         f"({', '.join(p.name for p in plans)})")
    return name


def check_resume_path(cfg: DictConfig, plans: list[StagePlan], run_dir: Path) -> None:
    """``resume=PATH`` applies to the stage it was saved in, which must be selected; the stages before it must be complete."""
    if str(cfg.resume) in RESUME_CHOICES:
        return
    name = resume_stage(cfg, plans)
    selected = [p.name for p in selected_stages(cfg, plans)]
    if name not in selected:
        raise ValueError(f"resume={cfg.resume} is a checkpoint of stage {name}, but stage={cfg.stage} "
                         f"runs {', '.join(selected)}; pass stage={name} or stage=all")
    for p in plans[: [q.name for q in plans].index(name)]:
        if p.name in selected and read_complete(run_dir / p.name) is None:
            raise ValueError(f"resume={cfg.resume} is a checkpoint of stage {name}, but the earlier stage {p.name} "
                             f"is not complete in {run_dir}; run it first, or pass stage={name}")


def check_fresh_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    if str(cfg.resume) == "never" and (any(run_dir.glob("*/checkpoints/*.ckpt")) or any(run_dir.glob(f"*/{COMPLETE_FILE}"))):
        raise FileExistsError(
            f"resume=never but {run_dir} already holds checkpoints; choose another run_dir "
            "(or resume=auto to continue it) -- nothing was overwritten"
        )


def check_finished_models(run_dir: Path, plans: list[StagePlan], model_cfg: DanubeConfig) -> None:
    """A completed stage's model directory must have the configured architecture (a hand-edited run dir, say)."""
    ours = {**model_cfg.to_dict(), "attn_backend": None}
    for plan in plans:
        model_dir = run_dir / plan.name / "model"
        if read_complete(run_dir / plan.name) is None:
            continue
        theirs = {**read_config(model_dir).to_dict(), "attn_backend": None}
        differ = sorted(k for k in ours if ours[k] != theirs.get(k))
        if differ:
            raise rundir.ConfigChanged(
                f"{model_dir} holds a model with other values of {', '.join(f'model.{k}' for k in differ)} than "
                f"this config ({', '.join(f'{theirs.get(k)!r} -> {ours[k]!r}' for k in differ)}); use another run_dir"
            )


def recorded_config(cfg: DictConfig, tokenizer: Tokenizer | None = None) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    if tokenizer is not None:
        config["data"]["tokenizer_sha256"] = tokenizer.checksum
    return config


def run(cfg: DictConfig) -> TrainResult | None:
    """Train the selected stage(s). With ``plan=true``, print the schedule and return None."""
    cfg = current_names(cfg, RENAMED, "train.py")
    plans, model_cfg = checked(cfg)
    if cfg.plan:
        o = cfg.optim
        print(format_plan(plans, lr=o.lr, min_lr=o.min_lr, warmup_tokens=int(o.warmup_tokens),
                          tokens_per_sec=float(cfg.plan_tokens_per_sec), world_size=world_size(cfg.trainer),
                          global_batch_tokens=int(cfg.train.global_batch_tokens)))
        return None
    runtime = pin_numerics(cfg)  # before any compute: MKL reads its mode at its first call
    sources, weights, tokenizer = prepare_data(cfg)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.model_file} has {tokenizer.vocab_size} pieces but model.vocab_size="
            f"{model_cfg.vocab_size}: the embedding must cover every id"
        )
    if cfg.get("model_dir"):
        check_start_tokenizer(Path(cfg.model_dir), tokenizer)
    run_dir = resolve_run_dir(cfg)
    with rundir.lock(run_dir):
        return _run_locked(cfg, plans, run_dir, model_cfg, sources, weights, tokenizer, runtime)


def _run_locked(cfg: DictConfig, plans: list[StagePlan], run_dir: Path, model_cfg: DanubeConfig, sources, weights,
                tokenizer: Tokenizer, runtime: dict) -> TrainResult:
    selected = selected_stages(cfg, plans)
    check_fresh_run_dir(cfg, run_dir)
    recorded = current_recorded(rundir.read_recorded(run_dir), RENAMED)
    finished = all(read_complete(run_dir / p.name) is not None for p in selected)
    changes = rundir.check_changes(run_dir, recorded, recorded_config(cfg), identity=IDENTITY_KEYS,
                                   cosmetic=COSMETIC_KEYS, ignore=IGNORED_KEYS + ("data.tokenizer_sha256",),
                                   finished=finished)
    check_finished_models(run_dir, plans, model_cfg)
    check_resume_path(cfg, plans, run_dir)
    recorded_tok = ((recorded or {}).get("data") or {}).get("tokenizer_sha256")
    if recorded_tok and recorded_tok != tokenizer.checksum:
        raise rundir.ConfigChanged(
            f"{run_dir} was trained on data tokenized with another tokenizer (sha256 {recorded_tok[:12]}...) than "
            f"this run's {tokenizer.model_file} (sha256 {tokenizer.checksum[:12]}...); use another run_dir"
        )
    log_file = None
    if rundir.is_rank_zero():
        remove_stale_temps(run_dir, recursive=True)
        if not finished:
            rundir.runtime_changes(run_dir, runtime)
        entry = rundir.record_invocation(run_dir, recorded_config(cfg, tokenizer), changes, runtime)
        log_file = logs.log_to_file(run_dir / "logs" / f"{entry.stem}.log")
    try:
        return _train_stages(cfg, plans, selected, run_dir, model_cfg, sources, weights, tokenizer, log_file)
    finally:
        if log_file is not None:
            logs.close_file(log_file)


def _train_stages(cfg, plans, selected, run_dir, model_cfg, sources, weights, tokenizer, log_file) -> TrainResult:
    L.seed_everything(int(cfg.seed), workers=True)
    start = time.perf_counter()
    total_tokens = plans[-1].end_tokens
    result, done, trained = None, [], 0
    for plan in selected:
        result = run_stage(cfg, plan, plans, run_dir, total_tokens, model_cfg, sources, weights, tokenizer)
        trained += result.trained_now
        if not result.complete:
            break
        done.append(plan.name)
    summarize(result, selected, done, trained, time.perf_counter() - start, cfg,
              Path(log_file.baseFilename) if log_file else None)
    return result


def summarize(result: TrainResult, selected: list[StagePlan], done: list[str], trained: int, seconds: float,
              cfg: DictConfig, log_path: Path | None) -> None:
    """What the invocation did, its final losses and where each output is."""
    losses = ", ".join(f"{name} {value:.4f}" for name, value in (("train loss", result.final_train_loss),
                                                                  ("val loss", result.final_val_loss))
                       if value is not None)
    speed = f", {trained / seconds:,.0f} tokens/s overall" if trained and seconds > 0 else ""
    if result.complete:
        head = (f"train.py done in {logs.duration(seconds)}: stage{'s' if len(done) > 1 else ''} {', '.join(done)} "
                f"complete, {result.tokens_seen:,} tokens seen ({trained:,} trained now{speed})")
    else:
        stage = selected[len(done)]
        head = (f"train.py stopped at train.max_steps={cfg.train.max_steps} in {logs.duration(seconds)}: stage "
                f"{stage.name} at {result.tokens_seen:,} of {stage.end_tokens:,} tokens ({trained:,} trained "
                f"now{speed}); not finished: the same command without train.max_steps continues it")
    lines = [head + (f"; final {losses}" if losses else ""),
             f"  model:       {result.model_dir}" if result.complete else
             f"  checkpoint:  {result.run_dir / selected[len(done)].name / 'checkpoints' / 'last.ckpt'}",
             f"  TensorBoard: tensorboard --logdir {result.run_dir / 'tensorboard'}  (danube plot {result.run_dir})"]
    if log_path:
        lines.append(f"  log:         {log_path}")
    log.info("\n".join(lines))


def tokens_at_step(plan: StagePlan, step: int, global_batch_tokens: int) -> int:
    return plan.start_tokens + step * global_batch_tokens


def run_stage(cfg, plan, plans, run_dir, total_tokens, model_cfg, sources, weights, tokenizer) -> TrainResult:
    from danube.data.pretrain import PretrainDataModule

    stage_dir = run_dir / plan.name
    model_dir = stage_dir / "model"
    if str(cfg.resume) == "auto":
        done = read_complete(stage_dir)
        if done is None and rundir.is_rank_zero():
            done = finish_from_final(stage_dir, plan, tokenizer, run_dir)
        if done is not None:
            log.info("stage %s is already complete (%s): skipping", plan.name, stage_dir / COMPLETE_FILE)
            return TrainResult(run_dir, model_dir, int(done["tokens_seen"]), done.get("final_train_loss"),
                               done.get("final_val_loss"))
    ckpt_path, init_from = stage_start(cfg, plan, plans, run_dir)
    resumed_step = checkpoint_step(ckpt_path) if ckpt_path else 0
    max_steps = plan.steps if cfg.train.get("max_steps") is None else min(plan.steps, int(cfg.train.max_steps))
    log.info("stage %s: seq_len %d, %s tokens, %d steps, micro-batch %d x %d accumulation%s", plan.name,
             plan.seq_len, f"{plan.tokens:,}", plan.steps, plan.micro_batch_size, plan.grad_accum,
             f", resuming {ckpt_path} (step {resumed_step})" if ckpt_path else (f", from {init_from}" if init_from else ""))
    if plan.weights is not None:
        weights = plan.weights
    log.info("stage %s mixture: %s", plan.name, format_mixture(weights) if weights else "proportional to tokens")
    datamodule = PretrainDataModule(
        sources=sources, weights=weights, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
        seed=int(cfg.seed) + plan.index, num_workers=int(cfg.data.num_workers),
        tokenizer_checksum=tokenizer.checksum, val_batches=cfg.train.val_batches, world_size=world_size(cfg.trainer),
    )
    module = build_module(cfg, model_cfg, plan, total_tokens, init_from, tokenizer, list(sources))
    # A resumed (or restarted) stage logs its steps again: hide what an earlier attempt logged after its
    # checkpoint -- or, restarted from the stage's start, all it logged (its first point too, logged again).
    events = any((run_dir / "tensorboard" / plan.name).glob("events.out.tfevents.*"))
    purge = None
    if events:
        purge = tokens_at_step(plan, resumed_step, int(cfg.train.global_batch_tokens)) + (1 if resumed_step else 0)
    boundary = StepBoundary(
        stage_dir / "checkpoints", every_n_steps=int(cfg.train.checkpoint_every_n_steps),
        keep=int(cfg.train.keep_checkpoints), last_step=max_steps,
        val_every_n_steps=None if cfg.train.val_batches == 0 else min(int(cfg.train.val_every_n_steps), plan.steps),
    )
    trainer = build_trainer(
        cfg, stage_dir=stage_dir, logger_dir=run_dir / "tensorboard", logger_version=plan.name,
        max_steps=max_steps, accumulate=plan.grad_accum, val_check_interval=plan.grad_accum, limit_val_batches=0,
        callbacks=[boundary], purge_step=purge, progress=f"{plan.name} (seq {plan.seq_len})",
    )
    val_loader = None

    def validate_once() -> float | None:
        nonlocal val_loader
        if val_loader is None:
            val_loader = datamodule.val_dataloader()
        loss = mean_validation_loss(trainer, val_loader, trainer.strategy.validation_step)
        if loss is not None:
            module.log_validation(loss)
        return loss

    boundary.validate = validate_once
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    expected = tokens_at_step(plan, max_steps, int(cfg.train.global_batch_tokens))
    if module.tokens_seen != expected:
        raise RuntimeError(
            f"stage {plan.name} ended at {module.tokens_seen:,} tokens instead of {expected:,}: the training data ran "
            "out of full micro-batches, or the loop stopped early; nothing was marked complete"
        )
    train = module.last_train_loss
    val = boundary.last_val[1] if boundary.last_val is not None else None
    result = TrainResult(run_dir, model_dir, module.tokens_seen, train, val, complete=max_steps == plan.steps,
                         trained_now=module.tokens_seen - tokens_at_step(plan, resumed_step,
                                                                          int(cfg.train.global_batch_tokens)))
    if result.complete and trainer.is_global_zero:
        # The last step's checkpoint: written by this fit, or the one it resumed from at the stage's end.
        last = boundary.last_saved or (Path(ckpt_path) if ckpt_path and resumed_step == max_steps else None)
        if last is None or not last.is_file():
            raise RuntimeError(f"stage {plan.name} finished without a checkpoint of its last step ({max_steps})")
        link_final(last, stage_dir / FINAL_CKPT)
        # Written from the checkpoint rather than the module: the same full state dict under every strategy.
        save_model_dir(model_from_checkpoint(load_checkpoint(last, mmap=True)), model_dir, tokenizer=tokenizer.model_file)
        write_complete(stage_dir, result, plan)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the other ranks go on to the next stage, which starts from final.ckpt
    return result


def link_final(last: Path, final: Path) -> None:
    """``final.ckpt`` is the stage's last step checkpoint: a hard link (no second copy on disk), else a copy."""
    import shutil

    from danube.files import atomic_file

    with atomic_file(final) as tmp:
        try:
            os.link(last, tmp)
        except OSError:
            shutil.copyfile(last, tmp)


def build_module(cfg, model_cfg: DanubeConfig, plan: StagePlan, total_tokens: int, init_from: str | None,
                 tokenizer: Tokenizer, source_names: list[str]):
    from danube.lit.pretrain import PretrainModule

    return PretrainModule(
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        total_tokens=total_tokens,
        seq_len=plan.seq_len,
        stage=plan.name,
        precision=OmegaConf.to_container(cfg.precision, resolve=True),
        log_every_n_steps=int(cfg.train.log_every_n_steps),
        loss_chunk_tokens=int(cfg.train.loss_chunk_tokens),
        compile=bool(cfg.train.compile),
        activation_checkpointing=bool(cfg.train.activation_checkpointing),
        peak_flops=peak_flops(cfg),
        source_names=source_names,
        init_from=init_from,
        tokenizer_checksum=tokenizer.checksum,
    )
