"""Chat fine-tuning: SFT of every parameter, or DPO with LoRA; what ``finetune.py`` runs.

Run directory layout::

    run_dir/
      config.yaml          # the resolved config
      tensorboard/<loss>/  # train/loss, train/lr; DPO: rewards/*, logps/*; val/* with held-out data,
                           # at the console's step numbers (step 0: the starting model's val/*)
      adapter/             # DPO only: the LoRA adapter (peft format)
      model/               # the result as a plain danube model directory (DPO: adapter merged)
      hf/                  # with export_hf=true: the same model as a Hugging Face directory
      metrics.json         # the last value of every metric (also in TensorBoard at the last step),
                           # the starting model's held-out metrics, the per-source data table

Fine-tuning writes model directories, not Lightning checkpoints: a run is one epoch
over a fixed data set, and a failed run is started again.

Data: every ``chat_data.sources`` entry is resolved first (a file, a local copy of a Hub
dataset or a Hub id; its split and columns: :mod:`danube.data.records`), then read and
tokenized one source at a time. Held-out items (``train.val_fraction``, or a source's
``val_split``) are validated before the first step, every ``train.val_every_n_steps`` and
after the last step.
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
from danube.callbacks import SignalStop
from danube.config import ChatSourceConfig, FinetuneConfig, typed
from danube.config import hydra_runtime
from danube.data.finetune import (ItemSettings, SourceData, Subsample, build_items, finetune_datamodule,
                                  micro_batches_per_step, step_plan)
from danube.data.tokenizer import Tokenizer
from danube.files import atomic_dir, atomic_write_text
from danube.model.io import check_model_dir, save_model_dir, tokenizer_path
from danube.model.loading import load_model
from danube.tasks.trainer import build_trainer, check_hardware

log = logging.getLogger(__name__)

FINISHED_FILE = "metrics.json"


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    hf_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    start_metrics: dict[str, float] = field(default_factory=dict)  # held-out metrics of the starting model
    data_counts: dict[str, Any] = field(default_factory=dict)  # totals; "sources": each source's line of the table
    steps: int = 0  # optimizer steps taken
    items: int = 0  # training items (samples, packed rows or pairs)


def open_sources(sources: dict[str, ChatSourceConfig], loss: str, seed: int = 0) -> dict[str, SourceData]:
    """Resolve every source (file, dataset directory, Hub id; split; columns) before anything is read.

    ``seed`` seeds the subsample of a source with ``max_rows`` or ``fraction`` and no ``seed`` of its own.
    """
    from danube.data import preference, sft
    from danube.data.records import Source

    opener = sft.open_conversations if loss == "sft" else preference.open_pairs
    out = {}
    for name, src in sources.items():
        key = f"chat_data.sources.{name}"
        source = Source(name, path=src.path, hub=src.hub, split=src.split, revision=src.revision)
        rows = opener(source, src.format)
        val_rows = None
        if src.val_split:
            if rows.kind == "file":
                raise ValueError(f"{key}.val_split={src.val_split}: {source.path} is a single file, with no "
                                 "splits; hold out a part of it with train.val_fraction")
            if src.val_split == rows.split:
                raise ValueError(f"{key}.val_split={src.val_split} is the split trained on")
            val_rows = opener(source.with_split(src.val_split), src.format)
        sub = None
        if src.max_rows is not None or src.fraction is not None:
            sub = Subsample(src.max_rows, src.fraction, seed if src.seed is None else src.seed)
        out[name] = SourceData(name, src.format, src.lang, rows, val_rows, sub)
    return out


def load(cfg: DictConfig) -> FinetuneConfig:
    """The door: the composed config as a :class:`FinetuneConfig`, every check made that needs no file read."""
    job = typed(cfg, FinetuneConfig, "finetune.py", FinetuneConfig.REQUIRED)
    check_hardware(job.trainer, job.precision)
    return job


def validate(cfg: DictConfig) -> tuple[FinetuneConfig, dict[str, SourceData]]:
    """Every check that can fail, before data is read or weights are loaded: the config, the model, the sources."""
    job = load(cfg)
    check_model_dir(job.model_dir, "model_dir")
    return job, open_sources(job.chat_data.sources, job.loss.name, job.seed)


def load_tokenizer(job: FinetuneConfig) -> Tokenizer:
    path = job.tokenizer or tokenizer_path(job.model_dir)
    if path is None:
        raise FileNotFoundError(f"model_dir={job.model_dir} holds no tokenizer.model; pass tokenizer=PATH")
    return Tokenizer(path)


def build_model(job: FinetuneConfig, tok: Tokenizer):
    model = load_model(job.model_dir, dtype="float32", what="model_dir")
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.model_file} has {tok.vocab_size} pieces but the model at {job.model_dir} "
                         f"embeds {model.cfg.vocab_size}: not this model's tokenizer")
    if job.train.activation_checkpointing:
        model.set_gradient_checkpointing(True)
    if job.loss.name == "dpo":
        from danube.lora import add_lora

        lora = job.loss.lora
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         target_modules=list(lora.target_modules), base_model=Path(job.model_dir).resolve())
    return model


def run(cfg: DictConfig) -> FinetuneResult:
    """Fine-tune ``model_dir`` on ``chat_data`` with ``loss`` (sft | dpo); write ``run_dir/model``."""
    job, sources = validate(cfg)
    runtime = job.train.pin(job.trainer)  # before any compute (see danube.determinism)
    tok = load_tokenizer(job)
    ws = job.trainer.world_size
    accumulate = micro_batches_per_step(job.train.batch_size, job.train.micro_batch_size, ws)
    run_dir = rundir.resolve(job.run_dir, name=job.name, runs_dir=job.paths.runs_dir, job_dir=hydra_runtime.job_dir())
    check_output(job, run_dir)
    with rundir.lock(run_dir, what="fine-tuning run"):
        log_file = None
        if rundir.is_rank_zero():
            entry = rundir.record_invocation(run_dir, OmegaConf.to_container(cfg, resolve=True), [], runtime)
            log_file = logs.log_to_file(run_dir / "logs" / f"{entry.stem}.log")
        start = time.perf_counter()
        try:
            result = _run_locked(job, sources, tok, ws, accumulate, run_dir)
        finally:
            if log_file is not None:
                logs.close_file(log_file)
        summarize(job, result, time.perf_counter() - start, Path(log_file.baseFilename) if log_file else None)
        return result


def summarize(job: FinetuneConfig, result: FinetuneResult, seconds: float, log_path: Path | None) -> None:
    """What the run did, its final metrics and where each output is."""
    m, start = result.metrics, result.start_metrics
    shown = ", ".join(f"{k} {m[k]:.4f}" + (f" (from {start[k]:.4f})" if k in start else "")
                      for k in ("train/loss", "val/loss", "val/rewards/accuracies", "val/rewards/margins") if k in m)
    lines = [f"finetune.py done in {logs.duration(seconds)}: {job.loss.name} of {job.model_dir}, "
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


def check_output(job: FinetuneConfig, run_dir: Path) -> None:
    """A fine-tuning run never writes over its own input, nor over a finished run without ``overwrite=true``."""
    model_dir = Path(job.model_dir).resolve()
    if model_dir == run_dir.resolve() or run_dir.resolve() in model_dir.parents:
        raise FileExistsError(
            f"model_dir={job.model_dir} lies inside this run's directory {run_dir}, which the run writes: the result "
            f"would replace its own input. Give the run its own name=NAME (or run_dir=PATH)"
        )
    if (run_dir / FINISHED_FILE).exists() and not job.overwrite:
        recorded = rundir.read_recorded(run_dir) or {}
        raise FileExistsError(
            f"{run_dir} already holds a fine-tuned model (from model_dir={recorded.get('model_dir', '?')}); give this "
            "run its own name=NAME (or run_dir=PATH), or pass overwrite=true to replace it"
        )


def _run_locked(job: FinetuneConfig, sources, tok: Tokenizer, ws: int, accumulate: int, run_dir: Path) -> FinetuneResult:
    L.seed_everything(job.seed, workers=True)
    t, loss = job.train, job.loss.name
    settings = ItemSettings(loss=loss, max_seq_len=t.max_seq_len, truncation=t.truncation, packing=t.packing,
                            val_fraction=t.val_fraction, seed=job.seed)
    items, val_items, collate_fn, counts = build_items(sources, tok, settings)
    plan = step_plan(len(items), t.micro_batch_size, accumulate, ws, t.epochs, job.seed)
    if t.max_steps:
        plan = plan[: t.max_steps]
    if not plan:
        raise ValueError(f"{len(items)} training items make no optimizer step of train.micro_batch_size="
                         f"{t.micro_batch_size} on {ws} device(s)")
    model = build_model(job, tok)
    if loss == "sft":
        from danube.lit.sft import SFTModule

        module = SFTModule(model, job.optim, total_steps=len(plan))
    else:
        from danube.lit.dpo import DPOModule

        module = DPOModule(model, job.optim, total_steps=len(plan), beta=job.loss.beta)
    log.info("%s: %d items, %d optimizer steps of %d (micro-batch %d x %d accumulation x %d device(s))%s",
             loss, len(items), len(plan), t.batch_size, t.micro_batch_size, accumulate, ws,
             f"; {len(val_items)} held out for validation" if val_items else "")
    # Lightning counts the validation interval in micro-batches; with no interval, validation
    # runs once, after the last step (below), and, with held-out items, once before the first
    # (the starting model's, at step 0). A run started again hides what a killed one logged.
    restarted = any((run_dir / "tensorboard" / loss).glob("events.out.tfevents.*"))
    trainer = build_trainer(job.trainer, job.precision, grad_clip=job.optim.grad_clip,
                            log_every_n_steps=t.log_every_n_steps, deterministic=t.deterministic_on(job.trainer),
                            stage_dir=run_dir, logger_dir=run_dir / "tensorboard", logger_version=loss,
                            max_steps=len(plan), accumulate=accumulate,
                            val_check_interval=(t.val_every_n_steps or len(plan)) * accumulate,
                            progress=f"{loss} steps", purge_step=0 if restarted else None,
                            callbacks=[SignalStop()], validate_first=bool(val_items))
    data = finetune_datamodule(items, plan, collate_fn, val_items=val_items, micro_batch_size=t.micro_batch_size,
                               num_workers=t.num_workers)
    with warnings.catch_warnings():
        # Without held-out items there is no val_dataloader, by design.
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`")
        trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if val_items and module.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=data, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    start = module.start_metrics or {}
    if val_items:
        log.info("validation after step %d: %s", trainer.global_step,
                 ", ".join(f"{k} {v:.4f}" + (f" (step 0: {start[k]:.4f})" if k in start else "")
                           for k, v in sorted(metrics.items()) if k.startswith("val/")))
    result = finish(job, trainer, module.model, run_dir, tok, metrics, counts, start)
    result.steps, result.items = trainer.global_step, len(items)
    return result


def finish(job: FinetuneConfig, trainer, model, run_dir: Path, tok: Tokenizer, metrics, counts,
           start_metrics: dict[str, float] | None = None) -> FinetuneResult:
    """Write the adapter (DPO), the plain model directory and optionally the Hugging Face export.

    ``metrics.json``: ``metrics`` (the last value of every metric: the last step's, the last
    validation's), ``start`` (the held-out metrics of the starting model, with held-out
    data) and ``data`` (the table of what was read).
    """
    adapter_dir = hf_dir = None
    model_dir = run_dir / "model"
    if trainer.is_global_zero:
        if job.loss.name == "dpo":
            from danube.lora import merge_lora

            adapter_dir = run_dir / "adapter"
            with atomic_dir(adapter_dir) as tmp:
                model.save_pretrained(str(tmp))
            model = merge_lora(model)  # what `danube merge-lora run_dir/adapter run_dir/model` writes
        save_model_dir(model, model_dir, tokenizer=tok.model_file)
        if job.export_hf:
            from danube.hf import to_hf

            hf_dir = to_hf(model, run_dir / "hf", tokenizer=tok.model_file)
        # Written last: a run directory with metrics.json holds a finished fine-tuning run.
        record = {"metrics": metrics, **({"start": start_metrics} if start_metrics else {}), "data": counts}
        atomic_write_text(run_dir / FINISHED_FILE, json.dumps(record, indent=2))
    return FinetuneResult(run_dir, model_dir, adapter_dir, hf_dir, metrics=metrics, start_metrics=start_metrics or {},
                          data_counts=counts)
