"""Chat fine-tuning: SFT of every parameter, or DPO with LoRA; what ``finetune.py`` runs.

Run directory layout::

    run_dir/
      config.yaml          # the resolved config
      tensorboard/<loss>/  # train/loss, train/lr; DPO: rewards/*, logps/*
      adapter/             # DPO only: the LoRA adapter (peft format)
      model/               # the result as a plain danube model directory (DPO: adapter merged)
      hf/                  # with export_hf=true: the same model as a Hugging Face directory
      metrics.json         # the last logged value of every metric

Fine-tuning writes model directories, not Lightning checkpoints: a run is one epoch
over a fixed data set, and a failed run is started again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from danube.callbacks import StageProgressBar
from danube.data.tokenizer import Tokenizer
from danube.model.io import check_model_dir, load_pretrained, save_model_dir, tokenizer_path
from danube.tasks.common import build_trainer, check_trainer_config, resolve_run_dir, save_resolved_config, world_size

log = logging.getLogger(__name__)

LOSSES = ("sft", "dpo")


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    hf_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    data_counts: dict[str, int] = field(default_factory=dict)


def _sources(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    if cfg.get("chat_data") is None:
        options = sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "conf" / "chat_data").glob("*.yaml"))
        raise ValueError(f"no chat_data chosen: pass chat_data=NAME ({', '.join(options) or 'see conf/chat_data/'})")
    sources = OmegaConf.to_container(cfg.chat_data.sources, resolve=True)
    if not isinstance(sources, dict) or not sources:
        raise ValueError("chat_data.sources must map names to {path, format}")
    return sources


def validate(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Every check that can fail, before data is read or weights are loaded."""
    from danube.data.preference import PAIR_READERS
    from danube.data.sft import FORMATS, TRUNCATION

    loss = cfg.loss.name
    if loss not in LOSSES:
        raise ValueError(f"loss.name={loss!r}; allowed: {', '.join(LOSSES)}")
    if cfg.get("model_dir") in (None, "???"):
        raise ValueError("model_dir=PATH is required: a danube model directory or a Hugging Face checkpoint directory")
    check_model_dir(cfg.model_dir, "model_dir")
    sources = _sources(cfg)
    allowed = FORMATS if loss == "sft" else tuple(PAIR_READERS)
    for name, src in sources.items():
        if not isinstance(src, dict) or "path" not in src or "format" not in src:
            raise ValueError(f"chat_data.sources.{name} must be {{path, format}}")
        if src["format"] not in allowed:
            raise ValueError(f"chat_data.sources.{name}.format={src['format']!r} is not {loss} data; "
                             f"allowed with loss={loss}: {', '.join(allowed)}")
        if not Path(src["path"]).is_file():
            raise FileNotFoundError(f"chat_data.sources.{name}.path={src['path']}: no such file")
    if str(cfg.train.truncation) not in TRUNCATION:
        raise ValueError(f"train.truncation={cfg.train.truncation!r}; allowed: {', '.join(TRUNCATION)}")
    if cfg.precision.get("fp8"):
        raise ValueError("precision=fp8 is for pretraining; fine-tune with precision=bf16 (or fp32)")
    check_trainer_config(cfg.trainer, cfg.precision)
    return sources


def load_tokenizer(cfg: DictConfig) -> Tokenizer:
    path = cfg.get("tokenizer") or tokenizer_path(cfg.model_dir)
    if path is None:
        raise FileNotFoundError(f"model_dir={cfg.model_dir} holds no tokenizer.model; pass tokenizer=PATH")
    return Tokenizer(path)


def build_items(cfg: DictConfig, sources: dict, tok: Tokenizer) -> tuple[list, Any, dict[str, int]]:
    """Tokenized samples (SFT: rows, packed or not; DPO: pairs), their collate function, counts."""
    from functools import partial

    max_len = int(cfg.train.max_seq_len)
    counts: dict[str, int] = {}
    items: list = []
    if cfg.loss.name == "sft":
        from danube.data.sft import collate, pack_samples, read_conversations, tokenize_conversations

        for name, src in sources.items():
            convs = read_conversations(src["path"], src["format"], lang=src.get("lang"))
            samples, c = tokenize_conversations(tok, convs, max_len, str(cfg.train.truncation), source=name)
            items += samples
            for k, n in c.items():
                counts[k] = counts.get(k, 0) + n
        if cfg.train.packing:
            n = len(items)
            items = pack_samples(items, max_len)
            log.info("packing: %d samples -> %d rows of at most %d tokens", n, len(items), max_len)
        return items, partial(collate, pad_id=tok.pad_id), counts
    from danube.data.preference import collate_pairs, read_pairs, tokenize_pairs

    for name, src in sources.items():
        pairs, c = tokenize_pairs(tok, read_pairs(src["path"], src["format"]), max_len, source=name)
        items += pairs
        counts["pairs"] = counts.get("pairs", 0) + len(pairs)
        for k, n in c.items():
            counts[k] = counts.get(k, 0) + n
    return items, partial(collate_pairs, pad_id=tok.pad_id), counts


class FinetuneData(L.LightningDataModule):
    """This rank's micro-batches of a fixed step plan (built the same on every rank)."""

    def __init__(self, items: list, plan: list, collate_fn, num_workers: int = 0) -> None:
        super().__init__()
        self.items, self.plan, self.collate_fn, self.num_workers = items, plan, collate_fn, num_workers

    def train_dataloader(self):
        from danube.data.sft import StepBatches

        rank = self.trainer.global_rank if self.trainer is not None else 0
        dataset = StepBatches(self.items, self.plan, rank, self.collate_fn)
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers)


def build_model(cfg: DictConfig, tok: Tokenizer):
    model = load_pretrained(cfg.model_dir, dtype=torch.float32)
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
    from lightning.pytorch.callbacks import ModelCheckpoint

    from danube.data.sft import micro_batches_per_step, step_plan

    sources = validate(cfg)
    tok = load_tokenizer(cfg)
    ws = world_size(cfg.trainer)
    accumulate = micro_batches_per_step(int(cfg.train.batch_size), int(cfg.train.micro_batch_size), ws)
    run_dir = resolve_run_dir(cfg)
    L.seed_everything(int(cfg.seed), workers=True)

    items, collate_fn, counts = build_items(cfg, sources, tok)
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
    log.info("%s: %d items, %d optimizer steps of %d (micro-batch %d x %d accumulation x %d device(s))",
             cfg.loss.name, len(items), len(plan), int(cfg.train.batch_size), int(cfg.train.micro_batch_size),
             accumulate, ws)
    save_resolved_config(cfg, run_dir)
    trainer = build_trainer(cfg, stage_dir=run_dir, logger_dir=run_dir / "tensorboard",
                            logger_version=cfg.loss.name, max_steps=len(plan), accumulate=accumulate,
                            val_check_interval=len(plan) * accumulate,
                            callbacks=[StageProgressBar(f"{cfg.loss.name} steps")])
    # The result is a model directory (below); Lightning's default end-of-epoch checkpoint
    # would only duplicate it with optimizer state.
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    trainer.fit(module, datamodule=FinetuneData(items, plan, collate_fn, int(cfg.train.num_workers)))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return finish(cfg, trainer, module.model, run_dir, tok, metrics, counts)


def finish(cfg, trainer, model, run_dir: Path, tok: Tokenizer, metrics, counts) -> FinetuneResult:
    """Write the adapter (DPO), the plain model directory and optionally the Hugging Face export."""
    adapter_dir = hf_dir = None
    model_dir = run_dir / "model"
    if trainer.is_global_zero:
        if cfg.loss.name == "dpo":
            from danube.lora import merge_lora

            adapter_dir = run_dir / "adapter"
            model.save_pretrained(str(adapter_dir))
            model = merge_lora(model)  # what `danube merge-lora run_dir/adapter run_dir/model` writes
        save_model_dir(model, model_dir, tokenizer=tok.model_file)
        if cfg.export_hf:
            from danube.hf import to_hf

            hf_dir = to_hf(model, run_dir / "hf", tokenizer=tok.model_file)
        (run_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "data": counts}, indent=2))
        log.info("fine-tuned model in %s%s", model_dir, f" (adapter in {adapter_dir})" if adapter_dir else "")
    return FinetuneResult(run_dir, model_dir, adapter_dir, hf_dir, metrics, counts)
