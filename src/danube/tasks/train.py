"""Pretraining: one or all stages of a recipe, resumable, with everything under ``run_dir``.

Run directory layout::

    run_dir/
      config.yaml                     # the resolved config of the last invocation
      tensorboard/<stage>/            # scalars with tokens seen as the x-axis
      <stage>/checkpoints/last.ckpt   # periodic + last (atomic writes)
      <stage>/final.ckpt              # written when the stage completes
      <stage>/model/                  # the stage's weights as a danube model directory

A stage may set its own data mixture (``weights: {source: share}`` in the recipe; default
``data.weights``), and the first stage may start from a model directory's weights
(``init_from``: fresh optimizer, tokens 0) as H2O-Danube2 started from H2O-Danube-1.8B.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from danube.callbacks import StageProgressBar
from danube.data.tokenizer import Tokenizer
from danube.model import DanubeConfig
from danube.model.attention import check_backend_available
from danube.model.io import check_model_dir, check_state_dict, save_model_dir, tokenizer_path
from danube.schedule import StagePlan, check_weights, format_mixture, format_plan, plan_stages
from danube.tasks.common import (
    build_trainer,
    check_trainer_config,
    peak_flops,
    resolve_run_dir,
    save_resolved_config,
    world_size,
)

log = logging.getLogger(__name__)

RESUME_CHOICES = ("auto", "never")


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    tokens_seen: int
    final_train_loss: float | None
    final_val_loss: float | None


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
    values = OmegaConf.to_container(cfg.model, resolve=True)
    values.pop("_target_", None)
    try:
        return DanubeConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model (conf/model/{model_choice(cfg)}.yaml + overrides): {err}") from err


def model_choice(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("model", "?") if HydraConfig.initialized() else "?"


def validate(cfg: DictConfig) -> list[StagePlan]:
    """Every check that can fail, before any data is read or any weight is built."""
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
    if not cfg.plan:  # a plan for 8 GPUs can be printed anywhere
        check_trainer_config(cfg.trainer, cfg.precision)
        check_backend_available(model_cfg.attn_backend, str(cfg.trainer.accelerator))
        if cfg.get("init_from"):
            check_init_from(Path(cfg.init_from), model_cfg)
    return plans


def source_names(cfg: DictConfig) -> list[str] | None:
    """The data sources' names, read from the config alone (None if they are not given yet)."""
    data = cfg.data
    if data.kind == "sample":
        return ["sample"]
    if data.kind == "sample_sources":
        from danube.data.sample import SOURCES

        return list(SOURCES)
    if data.kind != "shards":
        raise ValueError(f"data.kind={data.kind!r}; allowed: sample, sample_sources, shards")
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
    from danube.data.pretrain import _source_dict

    return {name: str(d) for name, d in _source_dict(sources).items()}


def check_mixtures(cfg: DictConfig, plans: list[StagePlan]) -> None:
    """``data.weights`` and every stage's ``weights`` must name exactly the data sources."""
    names = source_names(cfg)
    if names is None:
        return
    mixtures = [("data.weights", cfg.data.get("weights"))]
    mixtures += [(f"recipe stage {p.name!r} weights", p.weights) for p in plans]
    for where, weights in mixtures:
        if not weights:
            continue
        weights = dict(weights)
        unknown, missing = sorted(set(weights) - set(names)), sorted(set(names) - set(weights))
        if unknown or missing:
            raise ValueError(
                f"{where} name {sorted(weights)} but the data sources (data={data_choice(cfg)}) are {names}: "
                f"unknown {unknown}, missing {missing} (a source the stage does not use gets weight 0)"
            )
        check_weights(weights, where)


def data_choice(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("data", "?") if HydraConfig.initialized() else str(cfg.data.kind)


def check_init_from(path: Path, model_cfg: DanubeConfig) -> None:
    """``init_from`` must be a model directory whose tensors have the configured model's shapes.

    Only the safetensors header is read: a 1.8B directory is checked in milliseconds.
    """
    from safetensors import safe_open

    from danube.model import build_model
    from danube.model.io import WEIGHTS_FILE

    check_model_dir(path, "init_from", hf=False)
    if tokenizer_path(path) is None:
        raise FileNotFoundError(
            f"init_from={path} has no tokenizer.model: the run cannot check that its data uses the model's tokenizer"
        )
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    check_state_dict(build_model(model_cfg, device="meta"), shapes, f"init_from={path}")


def check_init_tokenizer(path: Path, tokenizer: Tokenizer) -> None:
    """The data must be tokenized with the model directory's tokenizer (after `danube swap-tokenizer`)."""
    theirs = Tokenizer(tokenizer_path(path))
    if theirs.checksum != tokenizer.checksum:
        raise ValueError(
            f"init_from={path} was trained with the tokenizer {theirs.model_file} (sha256 {theirs.checksum[:12]}...) "
            f"but this run's data uses {tokenizer.model_file} (sha256 {tokenizer.checksum[:12]}...): run "
            f"`danube swap-tokenizer {path} {tokenizer.model_file} NEW_DIR` and start from NEW_DIR"
        )


def prepare_data(cfg: DictConfig) -> tuple[dict[str, str], dict[str, float] | None, Tokenizer]:
    """Sources, weights and tokenizer; the embedded sample is built on first use."""
    data = cfg.data
    weights = OmegaConf.to_container(data.weights, resolve=True) if data.get("weights") else None
    if data.kind == "sample":
        from danube.data.sample import ensure_sample_data

        tok_path, shard_dir = ensure_sample_data(data.root, vocab_size=int(data.vocab_size))
        return {"sample": str(shard_dir)}, weights, Tokenizer(tok_path)
    if data.kind == "sample_sources":
        from danube.data.sample import ensure_sample_sources

        tok_path, dirs = ensure_sample_sources(data.root, vocab_size=int(data.vocab_size))
        return {name: str(d) for name, d in dirs.items()}, weights, Tokenizer(tok_path)
    if data.kind != "shards":
        raise ValueError(f"data.kind={data.kind!r}; allowed: sample, sample_sources, shards")
    sources = _plain(data.sources)
    if not isinstance(sources, dict):
        sources = _named_dirs(sources)
    return sources, weights, Tokenizer(data.tokenizer)


def run(cfg: DictConfig) -> TrainResult | None:
    """Train the selected stage(s). With ``plan=true``, print the schedule and return None."""
    plans = validate(cfg)
    if cfg.plan:
        o = cfg.optim
        print(format_plan(plans, lr=o.lr, min_lr=o.min_lr, warmup_tokens=int(o.warmup_tokens),
                          tokens_per_sec=float(cfg.plan_tokens_per_sec), world_size=world_size(cfg.trainer),
                          global_batch_tokens=int(cfg.train.global_batch_tokens)))
        return None
    model_cfg = model_config(cfg)
    sources, weights, tokenizer = prepare_data(cfg)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.model_file} has {tokenizer.vocab_size} pieces but model.vocab_size="
            f"{model_cfg.vocab_size}: the embedding must cover every id"
        )
    if cfg.get("init_from"):
        check_init_tokenizer(Path(cfg.init_from), tokenizer)
    run_dir = resolve_run_dir(cfg)
    check_fresh_run_dir(cfg, run_dir)
    save_resolved_config(cfg, run_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    total_tokens = plans[-1].end_tokens
    result = None
    for plan in selected_stages(cfg, plans):
        result = run_stage(cfg, plan, plans, run_dir, total_tokens, sources, weights, tokenizer)
    log.info("run directory %s: TensorBoard logs in %s, model in %s", run_dir, run_dir / "tensorboard",
             result.model_dir)
    return result


def check_fresh_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    if str(cfg.resume) == "never" and any(run_dir.glob("*/checkpoints/*.ckpt")):
        raise FileExistsError(
            f"resume=never but {run_dir} already holds checkpoints; choose another run_dir "
            "(or resume=auto to continue it) -- nothing was overwritten"
        )


def stage_start(cfg: DictConfig, plan: StagePlan, plans: list[StagePlan], run_dir: Path) -> tuple[str | None, str | None]:
    """(ckpt_path to resume this stage from, what to start from: the previous stage's checkpoint or init_from)."""
    resume = str(cfg.resume)
    if resume not in RESUME_CHOICES:
        return resume, None
    last = run_dir / plan.name / "checkpoints" / "last.ckpt"
    if resume == "auto" and last.is_file():
        return str(last), None
    if plan.index == 0:
        return None, (str(cfg.init_from) if cfg.get("init_from") else None)
    prev = plans[plan.index - 1]
    final = run_dir / prev.name / "final.ckpt"
    if not final.is_file():
        raise FileNotFoundError(
            f"stage {plan.name} starts from stage {prev.name}'s final checkpoint, {final}, which does not exist: "
            f"run stage={prev.name} first (same run_dir), or stage=all"
        )
    return None, str(final)


def run_stage(cfg, plan, plans, run_dir, total_tokens, sources, weights, tokenizer) -> TrainResult:
    from danube.data.pretrain import PretrainDataModule

    stage_dir = run_dir / plan.name
    model_dir = stage_dir / "model"
    if (stage_dir / "final.ckpt").is_file() and str(cfg.resume) == "auto":
        log.info("stage %s is already complete (%s): skipping", plan.name, stage_dir / "final.ckpt")
        ckpt = torch.load(stage_dir / "final.ckpt", map_location="cpu", weights_only=False)
        return TrainResult(run_dir, model_dir, int(ckpt["danube"]["tokens_seen"]), *logged_losses(run_dir, plan))
    ckpt_path, init_from = stage_start(cfg, plan, plans, run_dir)
    log.info("stage %s: seq_len %d, %s tokens, %d steps, micro-batch %d x %d accumulation%s", plan.name,
             plan.seq_len, f"{plan.tokens:,}", plan.steps, plan.micro_batch_size, plan.grad_accum,
             f", resuming {ckpt_path}" if ckpt_path else (f", from {init_from}" if init_from else ""))
    if plan.weights is not None:
        weights = plan.weights
    log.info("stage %s mixture: %s", plan.name, format_mixture(weights) if weights else "proportional to tokens")
    datamodule = PretrainDataModule(
        sources=sources, weights=weights, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
        seed=int(cfg.seed) + plan.index, num_workers=int(cfg.data.num_workers),
        tokenizer_checksum=tokenizer.checksum, val_batches=cfg.train.val_batches,
    )
    module = build_module(cfg, plan, total_tokens, init_from, tokenizer, list(sources))
    accumulate = plan.grad_accum
    trainer = build_trainer(
        cfg, stage_dir=stage_dir, logger_dir=run_dir / "tensorboard", logger_version=plan.name,
        max_steps=plan.steps, accumulate=accumulate,
        val_check_interval=min(int(cfg.train.val_every_n_steps), plan.steps) * accumulate,
        checkpoint_every_n_steps=int(cfg.train.checkpoint_every_n_steps),
        callbacks=[StageProgressBar(f"{plan.name} (seq {plan.seq_len})")],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    train = trainer.callback_metrics.get("train/loss")  # trainer.validate below resets callback_metrics
    if module.last_val_tokens != module.tokens_seen and trainer.limit_val_batches != 0:
        # Validation runs every val_every_n_steps; a stage's last step need not be one of
        # them, and its val loss is the one that matters (Figure 1, a sweep's objective).
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.save_checkpoint(stage_dir / "final.ckpt", weights_only=False)  # optimizer too: the next stage continues it
    if trainer.is_global_zero:
        save_model_dir(module.model, model_dir, tokenizer=tokenizer.model_file)
    val = trainer.callback_metrics.get("val/loss")
    return TrainResult(run_dir, model_dir, module.tokens_seen,
                       None if train is None else float(train), None if val is None else float(val))


def logged_losses(run_dir: Path, plan: StagePlan) -> tuple[float | None, float | None]:
    """(last train loss, last val loss) a finished stage logged: what its run returned then."""
    from danube.plot import read_scalars

    try:
        scalars = read_scalars(run_dir)
    except FileNotFoundError:
        return None, None
    last = [next((v for t, v in reversed(scalars.get(tag, [])) if plan.start_tokens < t <= plan.end_tokens), None)
            for tag in ("train/loss", "val/loss")]
    return last[0], last[1]


def build_module(cfg, plan: StagePlan, total_tokens: int, init_from: str | None, tokenizer: Tokenizer,
                 source_names: list[str]):
    from danube.lit.pretrain import PretrainModule

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_", None)
    return PretrainModule(
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        total_tokens=total_tokens,
        global_batch_tokens=int(cfg.train.global_batch_tokens),
        seq_len=plan.seq_len,
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
