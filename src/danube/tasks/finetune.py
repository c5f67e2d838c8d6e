"""Chat fine-tuning: SFT of every parameter, or DPO with LoRA; what ``finetune.py`` runs.

Run directory layout::

    run_dir/
      config.yaml          # the resolved config
      tensorboard/<loss>/  # train/loss, train/lr; DPO: rewards/*, logps/*; val/* with held-out data
      adapter/             # DPO only: the LoRA adapter (peft format)
      model/               # the result as a plain danube model directory (DPO: adapter merged)
      hf/                  # with export_hf=true: the same model as a Hugging Face directory
      metrics.json         # the last logged value of every metric

Fine-tuning writes model directories, not Lightning checkpoints: a run is one epoch
over a fixed data set, and a failed run is started again.

Data: every ``chat_data.sources`` entry is resolved first (a file, a local copy of a Hub
dataset or a Hub id; its split and columns: :mod:`danube.data.records`), then read and
tokenized one source at a time. Held-out items (``train.val_fraction``, or a source's
``val_split``) are validated every ``train.val_every_n_steps`` and after the last step.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from danube import logs, rundir
from danube.data.finetune import (LOSSES, ItemSettings, SourceData, build_items, finetune_datamodule,
                                  micro_batches_per_step, step_plan)
from danube.data.tokenizer import Tokenizer
from danube.files import atomic_dir, atomic_write_text
from danube.model.io import check_model_dir, save_model_dir, tokenizer_path
from danube.model.loading import load_model
from danube.tasks.common import (build_trainer, check_numerics, check_trainer_config, group_options, pin_numerics,
                                 resolve_run_dir, world_size)

log = logging.getLogger(__name__)

FINISHED_FILE = "metrics.json"


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    hf_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    data_counts: dict[str, int] = field(default_factory=dict)
    steps: int = 0  # optimizer steps taken
    items: int = 0  # training items (samples, packed rows or pairs)


SOURCE_OPTIONS = ("format", "lang", "val_split")


def _sources(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    if cfg.get("chat_data") is None:
        options = group_options("chat_data")
        raise ValueError(f"no chat_data chosen: pass chat_data=NAME ({', '.join(options) or 'see conf/chat_data/'})")
    sources = OmegaConf.to_container(cfg.chat_data.sources, resolve=True)
    if not isinstance(sources, dict) or not sources:
        raise ValueError("chat_data.sources must map names to {path or hub, format, ...}")
    return sources


def open_sources(sources: dict[str, dict[str, Any]], loss: str) -> dict[str, SourceData]:
    """Resolve every source (file, dataset directory, Hub id; split; columns) before anything is read."""
    from danube.data import preference, sft
    from danube.data.records import SOURCE_KEYS, Source

    allowed = sft.FORMATS if loss == "sft" else preference.FORMATS
    opener = sft.open_conversations if loss == "sft" else preference.open_pairs
    out = {}
    for name, src in sources.items():
        key = f"chat_data.sources.{name}"
        if not isinstance(src, dict) or "format" not in src:
            raise ValueError(f"{key} must be {{path or hub, format, ...}}")
        unknown = sorted(set(src) - {*SOURCE_KEYS, *SOURCE_OPTIONS})
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join((*SOURCE_KEYS, *SOURCE_OPTIONS))}")
        if src["format"] not in allowed:
            raise ValueError(f"{key}.format={src['format']!r} is not {loss} data; "
                             f"allowed with loss={loss}: {', '.join(allowed)}")
        source = Source(name, path=src.get("path"), hub=src.get("hub"), split=src.get("split"),
                        revision=src.get("revision"))
        rows = opener(source, src["format"])
        val_rows = None
        if src.get("val_split"):
            if rows.kind == "file":
                raise ValueError(f"{key}.val_split={src['val_split']}: {source.path} is a single file, with no "
                                 "splits; hold out a part of it with train.val_fraction")
            if src["val_split"] == rows.split:
                raise ValueError(f"{key}.val_split={src['val_split']} is the split trained on")
            val_rows = opener(source.with_split(str(src["val_split"])), src["format"])
        out[name] = SourceData(name, src["format"], src.get("lang"), rows, val_rows)
    return out


def validate(cfg: DictConfig) -> dict[str, SourceData]:
    """Every check that can fail, before data is read or weights are loaded."""
    from danube.data.sft import TRUNCATION

    loss = cfg.loss.name
    if loss not in LOSSES:
        raise ValueError(f"loss.name={loss!r}; allowed: {', '.join(LOSSES)}")
    if cfg.get("model_dir") in (None, "???"):
        raise ValueError("model_dir=PATH is required: a danube model directory or a Hugging Face checkpoint directory")
    check_model_dir(cfg.model_dir, "model_dir")
    check_numerics(cfg)
    sources = _sources(cfg)
    if str(cfg.train.truncation) not in TRUNCATION:
        raise ValueError(f"train.truncation={cfg.train.truncation!r}; allowed: {', '.join(TRUNCATION)}")
    val_fraction = float(cfg.train.get("val_fraction") or 0.0)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"train.val_fraction={val_fraction}: must be in [0, 1) (0: no held-out set)")
    val_every = cfg.train.get("val_every_n_steps")
    if val_every is not None and int(val_every) < 1:
        raise ValueError(f"train.val_every_n_steps={val_every}: must be a positive number of optimizer steps or null")
    if cfg.precision.get("fp8"):
        raise ValueError("precision=fp8 is for pretraining; fine-tune with precision=bf16 (or fp32)")
    check_trainer_config(cfg.trainer, cfg.precision)
    return open_sources(sources, loss)


def load_tokenizer(cfg: DictConfig) -> Tokenizer:
    path = cfg.get("tokenizer") or tokenizer_path(cfg.model_dir)
    if path is None:
        raise FileNotFoundError(f"model_dir={cfg.model_dir} holds no tokenizer.model; pass tokenizer=PATH")
    return Tokenizer(path)


def build_model(cfg: DictConfig, tok: Tokenizer):
    model = load_model(cfg.model_dir, dtype="float32", what="model_dir")
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.model_file} has {tok.vocab_size} pieces but the model at {cfg.model_dir} "
                         f"embeds {model.cfg.vocab_size}: not this model's tokenizer")
    if cfg.train.activation_checkpointing:
        model.set_gradient_checkpointing(True)
    if cfg.loss.name == "dpo":
        from danube.lora import add_lora

        lora = cfg.loss.lora
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         target_modules=list(lora.target_modules), base_model=Path(cfg.model_dir).resolve())
    return model


def run(cfg: DictConfig) -> FinetuneResult:
    """Fine-tune ``model_dir`` on ``chat_data`` with ``loss`` (sft | dpo); write ``run_dir/model``."""
    sources = validate(cfg)
    runtime = pin_numerics(cfg)  # before any compute (see danube.determinism)
    tok = load_tokenizer(cfg)
    ws = world_size(cfg.trainer)
    accumulate = micro_batches_per_step(int(cfg.train.batch_size), int(cfg.train.micro_batch_size), ws)
    run_dir = resolve_run_dir(cfg)
    check_output(cfg, run_dir)
    with rundir.lock(run_dir, what="fine-tuning run"):
        log_file = None
        if rundir.is_rank_zero():
            entry = rundir.record_invocation(run_dir, OmegaConf.to_container(cfg, resolve=True), [], runtime)
            log_file = logs.log_to_file(run_dir / "logs" / f"{entry.stem}.log")
        start = time.perf_counter()
        try:
            result = _run_locked(cfg, sources, tok, ws, accumulate, run_dir)
        finally:
            if log_file is not None:
                logs.close_file(log_file)
        summarize(cfg, result, time.perf_counter() - start, Path(log_file.baseFilename) if log_file else None)
        return result


def summarize(cfg: DictConfig, result: FinetuneResult, seconds: float, log_path: Path | None) -> None:
    """What the run did, its final metrics and where each output is."""
    m = result.metrics
    shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("train/loss", "val/loss", "val/rewards/accuracies",
                                                   "val/rewards/margins") if k in m)
    lines = [f"finetune.py done in {logs.duration(seconds)}: {cfg.loss.name} of {cfg.model_dir}, "
             f"{result.steps} optimizer steps over {result.items:,} items" + (f"; {shown}" if shown else ""),
             f"  model:       {result.model_dir}"]
    if result.adapter_dir:
        lines.append(f"  adapter:     {result.adapter_dir}")
    if result.hf_dir:
        lines.append(f"  Hugging Face: {result.hf_dir}")
    lines.append(f"  TensorBoard: tensorboard --logdir {result.run_dir / 'tensorboard'}")
    if log_path:
        lines.append(f"  log:         {log_path}")
    log.info("\n".join(lines))


def check_output(cfg: DictConfig, run_dir: Path) -> None:
    """A fine-tuning run never writes over its own input, nor over a finished run without ``overwrite=true``."""
    model_dir = Path(cfg.model_dir).resolve()
    if model_dir == run_dir.resolve() or run_dir.resolve() in model_dir.parents:
        raise FileExistsError(
            f"model_dir={cfg.model_dir} lies inside this run's directory {run_dir}, which the run writes: the result "
            f"would replace its own input. Give the run its own name=NAME (or run_dir=PATH)"
        )
    if (run_dir / FINISHED_FILE).exists() and not cfg.get("overwrite"):
        recorded = rundir.read_recorded(run_dir) or {}
        raise FileExistsError(
            f"{run_dir} already holds a fine-tuned model (from model_dir={recorded.get('model_dir', '?')}); give this "
            "run its own name=NAME (or run_dir=PATH), or pass overwrite=true to replace it"
        )


def _run_locked(cfg: DictConfig, sources, tok: Tokenizer, ws: int, accumulate: int, run_dir: Path) -> FinetuneResult:
    L.seed_everything(int(cfg.seed), workers=True)

    settings = ItemSettings(loss=cfg.loss.name, max_seq_len=int(cfg.train.max_seq_len),
                            truncation=str(cfg.train.truncation), packing=bool(cfg.train.packing),
                            val_fraction=float(cfg.train.get("val_fraction") or 0.0), seed=int(cfg.seed))
    items, val_items, collate_fn, counts = build_items(sources, tok, settings)
    plan = step_plan(len(items), int(cfg.train.micro_batch_size), accumulate, ws, int(cfg.train.epochs), int(cfg.seed))
    if cfg.train.get("max_steps"):
        plan = plan[: int(cfg.train.max_steps)]
    if not plan:
        raise ValueError(f"{len(items)} training items make no optimizer step of train.micro_batch_size="
                         f"{cfg.train.micro_batch_size} on {ws} device(s)")
    model = build_model(cfg, tok)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if cfg.loss.name == "sft":
        from danube.lit.sft import SFTModule

        module = SFTModule(model, optim, total_steps=len(plan))
    else:
        from danube.lit.dpo import DPOModule

        module = DPOModule(model, optim, total_steps=len(plan), beta=float(cfg.loss.beta))
    log.info("%s: %d items, %d optimizer steps of %d (micro-batch %d x %d accumulation x %d device(s))%s",
             cfg.loss.name, len(items), len(plan), int(cfg.train.batch_size), int(cfg.train.micro_batch_size),
             accumulate, ws, f"; {len(val_items)} held out for validation" if val_items else "")
    # Lightning counts the validation interval in micro-batches; with no interval, validation
    # runs once, after the last step (below). A run started again hides what a killed one logged.
    val_every = cfg.train.get("val_every_n_steps")
    restarted = any((run_dir / "tensorboard" / cfg.loss.name).glob("events.out.tfevents.*"))
    trainer = build_trainer(cfg, stage_dir=run_dir, logger_dir=run_dir / "tensorboard",
                            logger_version=cfg.loss.name, max_steps=len(plan), accumulate=accumulate,
                            val_check_interval=int(val_every or len(plan)) * accumulate,
                            progress=f"{cfg.loss.name} steps",
                            purge_step=0 if restarted else None)
    num_workers, mbs = int(cfg.train.num_workers), int(cfg.train.micro_batch_size)
    data = finetune_datamodule(items, plan, collate_fn, val_items=val_items, micro_batch_size=mbs,
                               num_workers=num_workers)
    with warnings.catch_warnings():
        # Without held-out items there is no val_dataloader, by design.
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`")
        trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if val_items and module.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=data, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    if val_items:
        log.info("validation after step %d: %s", trainer.global_step,
                 ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/")))
    result = finish(cfg, trainer, module.model, run_dir, tok, metrics, counts)
    result.steps, result.items = trainer.global_step, len(items)
    return result


def finish(cfg, trainer, model, run_dir: Path, tok: Tokenizer, metrics, counts) -> FinetuneResult:
    """Write the adapter (DPO), the plain model directory and optionally the Hugging Face export."""
    adapter_dir = hf_dir = None
    model_dir = run_dir / "model"
    if trainer.is_global_zero:
        if cfg.loss.name == "dpo":
            from danube.lora import merge_lora

            adapter_dir = run_dir / "adapter"
            with atomic_dir(adapter_dir) as tmp:
                model.save_pretrained(str(tmp))
            model = merge_lora(model)  # what `danube merge-lora run_dir/adapter run_dir/model` writes
        save_model_dir(model, model_dir, tokenizer=tok.model_file)
        if cfg.export_hf:
            from danube.hf import to_hf

            hf_dir = to_hf(model, run_dir / "hf", tokenizer=tok.model_file)
        # Written last: a run directory with metrics.json holds a finished fine-tuning run.
        atomic_write_text(run_dir / FINISHED_FILE, json.dumps({"metrics": metrics, "data": counts}, indent=2))
    return FinetuneResult(run_dir, model_dir, adapter_dir, hf_dir, metrics, counts)
