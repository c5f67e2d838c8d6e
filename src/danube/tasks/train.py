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
      <stage>/data/steps.jsonl        # what every optimizer step read, per source (danube data-report)
      <stage>/data/positions.jsonl    # the walk through the data at every checkpoint

A stage may set its own data mixture (``weights: {source: share}`` in the recipe; default
``data.weights``), and the first stage may start from a model directory's weights
(``model_dir``: fresh optimizer, tokens 0) as H2O-Danube2 started from H2O-Danube-1.8B.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from danube import logs, rundir
from danube.callbacks import StepBoundary, mean_validation_loss, sigterm_absorbed_when_leaving
from danube.checkpoints import check_checkpoint, checkpoint_stage, load_checkpoint, newest_intact
from danube.config import DanubeConfig, PretrainConfig, typed
from danube.config.train import upgrade_recorded
from danube.config import hydra_runtime
from danube.config.train import RESUME_CHOICES
from danube.data.tokenizer import Tokenizer
from danube.files import atomic_write_text, remove_stale_temps
from danube.model.attention import check_backend_available
from danube.model.io import check_model_dir, check_state_dict, is_model_dir, read_config, save_model_dir, tokenizer_path
from danube.schedule import Schedule, StagePlan, format_mixture, format_plan
from danube.tasks.trainer import build_trainer, check_hardware, peak_flops

log = logging.getLogger(__name__)

COMPLETE_FILE = "complete.json"
FINAL_CKPT = "final.ckpt"

# What a run directory's recorded config is compared on (see danube.rundir.check_changes).
# Not among them: the devices and the micro-batch (the walk through the data and the global batch do not
# depend on them: a run resumes on another number of devices), and the data mixture (a stage's weights, or
# data.weights: a change on a resume applies from the resumed step on, every source keeping its position).
IDENTITY_KEYS = ("model", "data.kind", "data.sources", "data.tokenizer", "data.vocab_size", "data.piece_tokens",
                 "data.lanes", "recipe", "seed", "model_dir", "train.global_batch_tokens", "cooldown")
COSMETIC_KEYS = ("model.attn_backend", "data.num_workers", "data.root", "train.log_every_n_steps",
                 "train.val_every_n_steps", "train.val_batches", "train.checkpoint_every_n_steps",
                 "train.keep_checkpoints", "train.compile", "train.activation_checkpointing",
                 "train.loss_chunk_tokens", "train.max_steps", "perf", "verbose",
                 # downstream evaluation reads the model, never changes it (danube.eval.in_training)
                 "train.eval_every_n_steps", "train.eval_tasks", "train.eval_include_path", "train.eval_limit",
                 "train.eval_num_fewshot", "train.eval_batch_size")
# model._target_: recorded by runs made before the model presets lost it (nothing ever instantiated it).
IGNORED_KEYS = ("name", "run_dir", "stage", "resume", "plan", "plan_tokens_per_sec", "paths", "model._target_",
                "init_from", "data.resume_old_order")
# What a plan may leave ??? (it reads no file): the data's paths and the start model.
PLAN_MAY_MISS = ("model_dir", "data.sources")


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    tokens_seen: int
    final_train_loss: float | None
    final_val_loss: float | None
    complete: bool = True  # False: stopped early at train.max_steps
    trained_now: int = 0  # tokens this invocation trained (0: the stage was already complete)


def load(cfg: DictConfig) -> PretrainConfig:
    """The door: the composed config as a :class:`PretrainConfig`, every check made that needs no file read.

    Types and ranges first (the schema), then the hardware asked for (unless only a plan
    is printed), then the rules between sections (stages against the batch and the
    devices, the model's context, the data's mixtures).
    """
    if cfg.get("plan"):
        cfg = _unknown_paths_as_none(cfg)
    job = typed(cfg, PretrainConfig, "train.py")
    check_multirun_job(job)
    if not job.plan:  # a plan for 8 GPUs can be printed anywhere; a run needs its hardware first
        check_hardware(job.trainer, job.precision)
        check_backend_available(job.model.attn_backend, job.trainer.accelerator)
    job.validate()
    return job


def _unknown_paths_as_none(cfg: DictConfig) -> DictConfig:
    """A plan reads no file: paths an experiment leaves ``???`` (its data, its start model) may stay unknown."""
    missing = [k for k in OmegaConf.missing_keys(cfg) if any(k == p or k.startswith(p + ".") for p in PLAN_MAY_MISS)]
    if not missing:
        return cfg
    cfg = cfg.copy()
    for key in missing:
        OmegaConf.update(cfg, key, None, force_add=True)
    return cfg


def validate(cfg: DictConfig) -> list[StagePlan]:
    """Every check that can fail, before any data is read or any weight is built; returns the stage plans."""
    return checked(cfg).plans()


def checked(cfg: DictConfig) -> PretrainConfig:
    """:func:`load` and the checks of the files a run starts from (``resume=PATH``, ``model_dir``)."""
    job = load(cfg)
    if job.resume not in RESUME_CHOICES and not Path(job.resume).is_file():
        raise ValueError(f"resume={job.resume!r}: expected auto, never, or the path of an existing .ckpt file")
    if not job.plan and job.model_dir:
        check_start_model(Path(job.model_dir), job.model)
    if not job.plan and job.train.evaluates:
        from danube.eval.in_training import check_tasks

        check_tasks(eval_plan(job), "train.eval_tasks", "train.eval_include_path")
    return job


def eval_plan(job: PretrainConfig):
    """``train.eval_*`` as the :class:`~danube.eval.in_training.EvalPlan` the training loop runs."""
    from danube.eval.in_training import EvalPlan

    t = job.train
    return EvalPlan(tuple(t.eval_tasks), include_path=t.eval_include_path, limit=t.eval_limit,
                    num_fewshot=t.eval_num_fewshot, batch_size=t.eval_batch_size)


def check_multirun_job(job: PretrainConfig) -> None:
    """In a multirun (a sweep), refuse the settings that would make jobs share or break their runs."""
    if not hydra_runtime.is_multirun():
        return
    if job.run_dir:
        raise ValueError(
            f"run_dir={job.run_dir} in a multirun: every job would write (and resume) the same directory. "
            "Leave run_dir unset, each job then runs in hydra.sweep.dir/<job number>; move the sweep with "
            "hydra.sweep.dir=PATH"
        )
    if job.trainer.world_size > 1:
        raise ValueError(
            f"trainer has {job.trainer.world_size} devices in a multirun: Lightning starts one process per extra "
            "device by re-running this command line, -m included, so each would start the whole sweep. "
            "Sweep with one device per job (trainer=h100x1); for several GPUs run one sweep per GPU "
            "(CUDA_VISIBLE_DEVICES, each with its own hydra.sweep.dir)"
        )


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


def prepare_data(job: PretrainConfig) -> tuple[dict[str, str], dict[str, float] | None, Tokenizer]:
    """Sources, weights and tokenizer; the embedded sample is built on first use."""
    data = job.data
    if data.kind == "sample":
        from danube.data.sample import ensure_sample_data

        tok_path, shard_dir = ensure_sample_data(data.root, vocab_size=data.vocab_size)
        return {"sample": str(shard_dir)}, data.weights, Tokenizer(tok_path)
    if data.kind == "sample_sources":
        from danube.data.sample import ensure_sample_sources

        tok_path, dirs = ensure_sample_sources(data.root, vocab_size=data.vocab_size)
        return {name: str(d) for name, d in dirs.items()}, data.weights, Tokenizer(tok_path)
    from danube.data.pretrain import named_sources

    return {name: str(d) for name, d in named_sources(data.sources).items()}, data.weights, Tokenizer(data.tokenizer)


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


def stage_start(job: PretrainConfig, plan: StagePlan, plans: list[StagePlan], run_dir: Path,
                start_from: str | None) -> tuple[str | None, str | None]:
    """(ckpt_path to resume this stage from, what to start from: the previous stage's final checkpoint, or for the
    first stage ``start_from``)."""
    resume = job.resume
    if resume not in RESUME_CHOICES and checkpoint_stage(resume, plans) == plan.name:
        return resume, None
    if resume == "auto":
        found = newest_intact(run_dir / plan.name / "checkpoints")
        if found is not None:
            return str(found[1]), None
    if plan.index == 0:
        return None, start_from
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


def check_resume_path(job: PretrainConfig, plans: list[StagePlan], selected: list[StagePlan], run_dir: Path) -> None:
    """``resume=PATH`` applies to the stage it was saved in, which must be selected; the stages before it must be complete."""
    if job.resume in RESUME_CHOICES:
        return
    name = checkpoint_stage(job.resume, plans)
    selected = [p.name for p in selected]
    if name not in selected:
        raise ValueError(f"resume={job.resume} is a checkpoint of stage {name}, but stage={job.stage} "
                         f"runs {', '.join(selected)}; pass stage={name} or stage=all")
    for p in plans[: [q.name for q in plans].index(name)]:
        if p.name in selected and read_complete(run_dir / p.name) is None:
            raise ValueError(f"resume={job.resume} is a checkpoint of stage {name}, but the earlier stage {p.name} "
                             f"is not complete in {run_dir}; run it first, or pass stage={name}")


def check_fresh_run_dir(job: PretrainConfig, run_dir: Path) -> None:
    if job.resume == "never" and (any(run_dir.glob("*/checkpoints/*.ckpt")) or any(run_dir.glob(f"*/{COMPLETE_FILE}"))):
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
    """What the run directory records: the composed config, resolved (renamed keys under their new names)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for old, new in PretrainConfig.RENAMED.items():
        if config.get(old) is not None:
            config[new] = config[old]
        config.pop(old, None)
    if tokenizer is not None:
        config["data"]["tokenizer_sha256"] = tokenizer.checksum
    return config


def mixtures_apart(config: dict | None) -> dict | None:
    """``config`` with each stage's ``weights`` moved to ``mixture.<stage>``: a mixture may change on a resume."""
    if not config:
        return config
    config = dict(config)
    recipe = dict(config.get("recipe") or {})
    stages = []
    mixture = {}
    for stage in recipe.get("stages") or []:
        stage = dict(stage)
        mixture[str(stage.get("name"))] = stage.pop("weights", None)
        stages.append(stage)
    if stages:
        recipe["stages"] = stages
        config["recipe"] = recipe
        config["mixture"] = mixture
    return config


def run(cfg: DictConfig) -> TrainResult | None:
    """Train the selected stage(s) of the composed config. With ``plan=true``, print the schedule and return None.

    With ``cooldown.checkpoint`` the run is a cooldown branched from that checkpoint
    (:mod:`danube.tasks.cooldown`): one stage, its own run directory.
    """
    job = checked(cfg)
    plans = job.plans()
    branch = None
    if job.cooldown.checkpoint:
        from danube.tasks.cooldown import open_branch

        branch = open_branch(job, plans, recorded_config(cfg))
    if job.plan:
        print(format_plan([branch.plan] if branch else plans,
                          schedule=branch.schedule if branch else job.optim.schedule_over(plans[-1].end_tokens),
                          tokens_per_sec=job.plan_tokens_per_sec, world_size=job.trainer.world_size,
                          global_batch_tokens=job.train.global_batch_tokens))
        if branch:
            from danube.tasks.cooldown import describe

            print(describe(branch))
        return None
    runtime = job.train.pin(job.trainer)  # before any compute: MKL reads its mode at its first call
    sources, weights, tokenizer = prepare_data(job)
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.model_file} has {tokenizer.vocab_size} pieces but model.vocab_size="
            f"{job.model.vocab_size}: the embedding must cover every id"
        )
    if job.model_dir:
        check_start_tokenizer(Path(job.model_dir), tokenizer)
    run_dir = rundir.resolve(job.run_dir or (branch.default_run_dir() if branch and not hydra_runtime.job_dir() else None),
                             name=job.name or hydra_runtime.choice("model"), runs_dir=job.paths.runs_dir,
                             job_dir=hydra_runtime.job_dir())
    if branch:
        from danube.tasks.cooldown import check_run_dir

        check_run_dir(branch, run_dir)
    with rundir.lock(run_dir), sigterm_absorbed_when_leaving():
        return _run_locked(job, recorded_config(cfg, tokenizer), plans, run_dir, sources, weights, tokenizer, runtime,
                           branch)


def _run_locked(job: PretrainConfig, config: dict, plans: list[StagePlan], run_dir: Path, sources, weights,
                tokenizer: Tokenizer, runtime: dict, branch=None) -> TrainResult:
    if branch is not None:  # a cooldown: its one stage is this run's recipe
        plans = selected = [branch.plan]
    else:
        selected = job.selected()
    check_fresh_run_dir(job, run_dir)
    recorded = upgrade_recorded(rundir.read_recorded(run_dir))
    finished = all(read_complete(run_dir / p.name) is not None for p in selected)
    changes = rundir.check_changes(run_dir, mixtures_apart(recorded), mixtures_apart(config), identity=IDENTITY_KEYS,
                                   cosmetic=COSMETIC_KEYS, ignore=IGNORED_KEYS + ("data.tokenizer_sha256",),
                                   finished=finished)
    check_finished_models(run_dir, plans, job.model)
    check_resume_path(job, plans, selected, run_dir)
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
        entry = rundir.record_invocation(run_dir, config, changes, runtime)
        log_file = logs.log_to_file(run_dir / "logs" / f"{entry.stem}.log")
    try:
        return _train_stages(job, plans, selected, run_dir, sources, weights, tokenizer, log_file, branch)
    finally:
        if log_file is not None:
            logs.close_file(log_file)


def _train_stages(job: PretrainConfig, plans, selected, run_dir, sources, weights, tokenizer, log_file,
                  branch=None) -> TrainResult:
    L.seed_everything(job.seed, workers=True)
    start = time.perf_counter()
    schedule = branch.schedule if branch else job.optim.schedule_over(plans[-1].end_tokens)
    if branch:
        from danube.tasks.cooldown import describe, pin_start

        log.info(describe(branch))
        start_from = str(pin_start(branch, run_dir))
    result, done, trained = None, [], 0
    for plan in selected:
        result = run_stage(job, plan, plans, run_dir, schedule, sources, weights, tokenizer,
                           start_from=start_from if branch else job.model_dir,
                           longest_seq_len=branch.longest_seq_len if branch else max(p.seq_len for p in plans))
        trained += result.trained_now
        if not result.complete:
            break
        done.append(plan.name)
    summarize(result, selected, done, trained, time.perf_counter() - start, job.train.max_steps,
              Path(log_file.baseFilename) if log_file else None, branch)
    return result


def summarize(result: TrainResult, selected: list[StagePlan], done: list[str], trained: int, seconds: float,
              max_steps: int | None, log_path: Path | None, branch=None) -> None:
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
        head = (f"train.py stopped at train.max_steps={max_steps} in {logs.duration(seconds)}: stage "
                f"{stage.name} at {result.tokens_seen:,} of {stage.end_tokens:,} tokens ({trained:,} trained "
                f"now{speed}); not finished: the same command without train.max_steps continues it")
    lines = [head + (f"; final {losses}" if losses else ""),
             f"  model:       {result.model_dir}" if result.complete else
             f"  checkpoint:  {result.run_dir / selected[len(done)].name / 'checkpoints' / 'last.ckpt'}",
             f"  TensorBoard: tensorboard --logdir {result.run_dir / 'tensorboard'}  (danube plot {result.run_dir})"]
    if log_path:
        lines.append(f"  log:         {log_path}")
    if branch is not None and result.complete and result.final_val_loss is not None:
        from danube.tasks.cooldown import parent_val_loss

        before = parent_val_loss(branch)
        there = (f"{before[1]:.4f} (the parent's, at {before[0]:,} tokens)" if before else
                 f"? (the parent logged none by {branch.tokens_seen:,} tokens)")
        lines.append(f"  cooldown:    val loss {there} -> {result.final_val_loss:.4f} after "
                     f"{branch.plan.tokens:,} tokens of {branch.schedule.shape} decay from {branch.tokens_seen:,}")
    log.info("\n".join(lines))


def tokens_at_step(plan: StagePlan, step: int, global_batch_tokens: int) -> int:
    return plan.start_tokens + step * global_batch_tokens


def run_stage(job: PretrainConfig, plan, plans, run_dir, schedule, sources, weights, tokenizer, *,
              start_from: str | None, longest_seq_len: int) -> TrainResult:
    """Train (or resume, or skip when complete) one stage of ``plans``.

    Args:
        schedule: the LR schedule, in tokens, of the whole run.
        start_from: what the first stage starts from: a model directory (``model_dir``), a
            cooldown's checkpoint, or None (fresh weights).
        longest_seq_len: the recipe's longest sequence length (the walk through the data is cut by it).
    """
    from danube.data.pretrain import PretrainDataModule

    t = job.train
    stage_dir = run_dir / plan.name
    model_dir = stage_dir / "model"
    if job.resume == "auto":
        done = read_complete(stage_dir)
        if done is None and rundir.is_rank_zero():
            done = finish_from_final(stage_dir, plan, tokenizer, run_dir)
        if done is not None:
            log.info("stage %s is already complete (%s): skipping", plan.name, stage_dir / COMPLETE_FILE)
            return TrainResult(run_dir, model_dir, int(done["tokens_seen"]), done.get("final_train_loss"),
                               done.get("final_val_loss"))
    ckpt_path, init_from = stage_start(job, plan, plans, run_dir, start_from)
    resumed_step = checkpoint_step(ckpt_path) if ckpt_path else 0
    max_steps = plan.steps if t.max_steps is None else min(plan.steps, t.max_steps)
    log.info("stage %s: seq_len %d, %s tokens, %d steps, micro-batch %d x %d accumulation%s", plan.name,
             plan.seq_len, f"{plan.tokens:,}", plan.steps, plan.micro_batch_size, plan.grad_accum,
             f", resuming {ckpt_path} (step {resumed_step})" if ckpt_path else (f", from {init_from}" if init_from else ""))
    if plan.weights is not None:
        weights = plan.weights
    log.info("stage %s mixture: %s", plan.name, format_mixture(weights) if weights else "proportional to tokens")
    datamodule = PretrainDataModule(
        sources=sources, weights=weights, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
        global_batch_size=t.global_batch_tokens // plan.seq_len, steps=plan.steps, seed=job.seed,
        num_workers=job.data.num_workers, tokenizer_checksum=tokenizer.checksum, val_batches=t.val_batches,
        world_size=job.trainer.world_size, longest_seq_len=longest_seq_len,
        piece_tokens=job.data.piece_tokens, lanes=job.data.lanes,
        start=stage_position(init_from, job.data.resume_old_order), record_dir=stage_dir / "data",
        resume_old_order=job.data.resume_old_order,
    )
    if ckpt_path:
        stage_position(ckpt_path, job.data.resume_old_order)  # an old order is refused before the model is built
    module = build_module(job, plan, schedule, init_from, tokenizer, list(sources))
    # A resumed (or restarted) stage logs its steps again: hide what an earlier attempt logged after its
    # checkpoint -- or, restarted from the stage's start, all it logged (its first point too, logged again).
    events = any((run_dir / "tensorboard" / plan.name).glob("events.out.tfevents.*"))
    purge = None
    if events:
        purge = tokens_at_step(plan, resumed_step, t.global_batch_tokens) + (1 if resumed_step else 0)
    boundary = StepBoundary(
        stage_dir / "checkpoints", every_n_steps=t.checkpoint_every_n_steps, keep=t.keep_checkpoints,
        last_step=max_steps, val_every_n_steps=None if t.val_batches == 0 else min(t.val_every_n_steps, plan.steps),
        eval_every_n_steps=t.eval_every_n_steps if t.evaluates else None,
    )
    trainer = build_trainer(
        job.trainer, job.precision, grad_clip=job.optim.grad_clip, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic_on(job.trainer), stage_dir=stage_dir, logger_dir=run_dir / "tensorboard",
        logger_version=plan.name, max_steps=max_steps, accumulate=plan.grad_accum, val_check_interval=plan.grad_accum,
        limit_val_batches=0, callbacks=[boundary], purge_step=purge, progress=f"{plan.name} (seq {plan.seq_len})",
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
    if t.evaluates:
        boundary.evaluate = lambda: evaluate_once(job, trainer, module, tokenizer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    expected = tokens_at_step(plan, max_steps, t.global_batch_tokens)
    if module.tokens_seen != expected:
        raise RuntimeError(
            f"stage {plan.name} ended at {module.tokens_seen:,} tokens instead of {expected:,}: the training data ran "
            "out of full micro-batches, or the loop stopped early; nothing was marked complete"
        )
    train = module.last_train_loss
    val = boundary.last_val[1] if boundary.last_val is not None else None
    result = TrainResult(run_dir, model_dir, module.tokens_seen, train, val, complete=max_steps == plan.steps,
                         trained_now=module.tokens_seen - tokens_at_step(plan, resumed_step, t.global_batch_tokens))
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


def evaluate_once(job: PretrainConfig, trainer, module, tokenizer: Tokenizer) -> None:
    """``train.eval_tasks`` on the model being trained, logged at the tokens seen (every rank calls it)."""
    from danube.eval.in_training import evaluate_in_training

    scalars, seconds = evaluate_in_training(module.model, tokenizer.model_file, eval_plan(job),
                                            rank=trainer.global_rank, world_size=trainer.world_size,
                                            sharded=job.trainer.strategy == "fsdp")
    module.log_downstream(scalars, seconds)


def stage_position(path: str | None, resume_old_order: bool) -> dict | None:
    """The walk's state a checkpoint ends at (None: a model directory, or no start: every source at its start)."""
    from danube.data.pretrain import OldOrder, data_position

    if not path or not Path(path).is_file():
        return None
    position = data_position(load_checkpoint(path, mmap=True))
    if position and "order" in position:
        return position["order"]
    if resume_old_order:
        log.warning("%s holds no position of the global data order (written by danube 0.1): the walk starts at "
                    "every source's beginning (data.resume_old_order=true); tokens read before may be read again",
                    path)
        return None
    raise OldOrder(
        f"{path} was written with danube 0.1's per-rank data order, which this release replaced (README: one walk "
        "through the data): its position cannot be continued, and starting over would read its tokens again. Pass "
        "data.resume_old_order=true to continue with the new order from each source's start, or use a new run_dir")


def link_final(last: Path, final: Path) -> None:
    """``final.ckpt`` is the stage's last step checkpoint: a hard link (no second copy on disk), else a copy."""
    import shutil

    from danube.files import atomic_file

    with atomic_file(final) as tmp:
        try:
            os.link(last, tmp)
        except OSError:
            shutil.copyfile(last, tmp)


def build_module(job: PretrainConfig, plan: StagePlan, schedule: Schedule, init_from: str | None,
                 tokenizer: Tokenizer, source_names: list[str]):
    from danube.lit.pretrain import PretrainModule

    return PretrainModule(
        model=job.model,
        optim=job.optim,
        schedule=schedule,
        seq_len=plan.seq_len,
        stage=plan.name,
        precision=job.precision,
        log_every_n_steps=job.train.log_every_n_steps,
        loss_chunk_tokens=job.train.loss_chunk_tokens,
        compile=job.train.compile,
        activation_checkpointing=job.train.activation_checkpointing,
        peak_flops=peak_flops(job.perf.peak_flops, job.trainer, job.model),
        source_names=source_names,
        init_from=init_from,
        tokenizer_checksum=tokenizer.checksum,
        seed=job.seed,
    )
