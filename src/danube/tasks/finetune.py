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
import random
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from danube import logs, rundir
from danube.data.tokenizer import Tokenizer
from danube.files import atomic_dir, atomic_write_text
from danube.model.io import check_model_dir, load_pretrained, save_model_dir, tokenizer_path
from danube.tasks.common import build_trainer, check_trainer_config, resolve_run_dir, world_size

log = logging.getLogger(__name__)

LOSSES = ("sft", "dpo")
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


@dataclass
class SourceData:
    """One ``chat_data`` source, resolved: its rows, its held-out rows (``val_split``), format, language."""

    name: str
    format: str
    lang: str | None
    rows: Any  # danube.data.records.Rows
    val_rows: Any = None


def _sources(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    if cfg.get("chat_data") is None:
        options = sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "conf" / "chat_data").glob("*.yaml"))
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


@dataclass
class SourceCounts:
    """What one source gave, for the log's table and ``metrics.json``."""

    rows: int = 0
    kept: int = 0  # conversations (SFT) or pairs (DPO) read
    dropped: int = 0  # by the reader (trees, reply groups, identical pairs)
    items: int = 0  # tokenized samples or pairs kept
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0  # SFT: answer tokens; DPO: completion tokens

    def add(self, other: "SourceCounts") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


def _item_tokens(item) -> tuple[int, int]:
    if hasattr(item, "chosen"):  # a tokenized preference pair: two whole rows, completions at their ends
        completions = len(item.chosen) - item.chosen_start + len(item.rejected) - item.rejected_start
        return len(item.chosen) + len(item.rejected), completions
    return len(item.input_ids), item.loss_tokens


def read_source(cfg: DictConfig, data: SourceData, rows, tok: Tokenizer, label: str) -> tuple[list, Counter,
                                                                                             SourceCounts]:
    """Read and tokenize one split of one source, streaming (only the tokenized items are held)."""
    from danube.data.records import ReadStats

    max_len = int(cfg.train.max_seq_len)
    stats = ReadStats()
    if cfg.loss.name == "sft":
        from danube.data.sft import iter_conversations, tokenize_conversations

        records = iter_conversations(rows, data.format, lang=data.lang, stats=stats)
        items, c = tokenize_conversations(tok, records, max_len, str(cfg.train.truncation), source=label)
        what = "conversations"
    else:
        from danube.data.preference import iter_pairs, tokenize_pairs

        items, c = tokenize_pairs(tok, iter_pairs(rows, data.format, lang=data.lang, stats=stats), max_len,
                                  source=label)
        what = "pairs"
    tokens = [_item_tokens(x) for x in items]
    n = SourceCounts(rows=stats.rows, kept=stats.kept, dropped=sum(stats.dropped.values()), items=len(items),
                     truncated=sum(v for k, v in c.items() if "truncated" in k),
                     tokens=sum(t for t, _ in tokens), trained_tokens=sum(t for _, t in tokens))
    log.info("%s: %s; %d %s tokenized -> %d (%s); %s tokens, %s trained", label, stats.summary(what), stats.kept,
             what, len(items), ", ".join(f"{v} {k}" for k, v in c.items() if k != "samples") or "none cut or dropped",
             f"{n.tokens:,}", f"{n.trained_tokens:,}")
    return items, c, n


def hold_out(items: list, fraction: float, seed: int, name: str) -> tuple[list, list]:
    """(kept for training, held out): a seeded ``fraction`` of ``items``, the same on every rank and run."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(random.Random(f"{seed}:{name}").sample(range(len(items)), n_val))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def log_table(loss: str, lines: list[tuple[str, str | None, SourceCounts, int]], val_items: int) -> SourceCounts:
    """Log what was read, per source and in all; returns the training total.

    ``lines``: (source, split, counts, items held out); a source's ``val_split`` has a
    line of its own, named ``NAME (val)``, whose items are all held out. The report's SFT
    mix totals 157k samples: this is the table to compare with it.
    """
    item = "conversations" if loss == "sft" else "pairs"
    total = SourceCounts()
    for name, _, n, _ in lines:
        if not name.endswith("(val)"):
            total.add(n)
    head = ("source", "split", "rows", item, "dropped", "items", "truncated", "tokens", "trained", "held out")
    cells = [head]
    for name, split, n, held in [*lines, ("total", "", total, val_items)]:
        cells.append((name, "-" if split is None else split, *(f"{v:,}" for v in (n.rows, n.kept, n.dropped, n.items, n.truncated,
                                                               n.tokens, n.trained_tokens, held))))
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    text = "\n".join("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)
    log.info("chat data read (%s; items: %s after tokenization; held out: for validation):\n%s", loss,
             "samples" if loss == "sft" else "pairs", text)
    return total


def build_items(cfg: DictConfig, sources: dict[str, SourceData], tok: Tokenizer) -> tuple[list, list, Any,
                                                                                          dict[str, int]]:
    """Tokenized training and validation items (SFT: rows, packed or not; DPO: pairs), the collate function, counts.

    Validation items come from a source's ``val_split`` when it has one, else from a seeded
    ``train.val_fraction`` of its items (none by default: the report holds nothing out).
    """
    from functools import partial

    max_len = int(cfg.train.max_seq_len)
    fraction = float(cfg.train.get("val_fraction") or 0.0)
    counts: Counter = Counter()
    items: list = []
    val_items: list = []
    lines: list[tuple[str, str | None, SourceCounts, int]] = []
    for name, data in sources.items():
        got, c, n = read_source(cfg, data, data.rows, tok, name)
        counts.update(c)
        if data.val_rows is not None:
            held, _, n_val = read_source(cfg, data, data.val_rows, tok, f"{name} (validation)")
            lines += [(name, data.rows.split, n, 0), (f"{name} (val)", data.val_rows.split, n_val, len(held))]
        else:
            got, held = hold_out(got, fraction, int(cfg.seed), name)
            lines.append((name, data.rows.split, n, len(held)))
        items += got
        val_items += held
    total = log_table(cfg.loss.name, lines, len(val_items))
    counts.update({"rows": total.rows, "tokens": total.tokens, "trained_tokens": total.trained_tokens,
                   "validation_items": len(val_items)})
    if fraction > 0 and not val_items:
        log.warning("train.val_fraction=%s held nothing out (too few items)", fraction)
    if cfg.loss.name == "sft":
        from danube.data.sft import collate, pack_samples

        if cfg.train.packing:
            n = len(items)
            items, val_items = pack_samples(items, max_len), pack_samples(val_items, max_len)
            log.info("packing: %d samples -> %d rows of at most %d tokens", n, len(items), max_len)
        return items, val_items, partial(collate, pad_id=tok.pad_id), dict(counts)
    from danube.data.preference import collate_pairs

    counts["pairs"] = total.items
    return items, val_items, partial(collate_pairs, pad_id=tok.pad_id), dict(counts)


class MicroBatches(torch.utils.data.Dataset):
    """This rank's share of ``items`` in micro-batches, in order, each item counted once (validation).

    Every rank gets the same number of micro-batches, so that all of them run the
    validation pass and its reduce: a rank short of one repeats the first micro-batch
    with ``counted`` 0, which the validation step multiplies its sums by.
    """

    def __init__(self, items: list, micro_batch_size: int, rank: int, world_size: int, collate_fn) -> None:
        self.items, self.collate_fn = items, collate_fn
        chunks = [list(range(s, min(s + micro_batch_size, len(items)))) for s in range(0, len(items), micro_batch_size)]
        mine = [(c, True) for c in chunks[rank::world_size]]
        self.batches = mine + [(chunks[0], False)] * (-(-len(chunks) // world_size) - len(mine))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        indices, counted = self.batches[i]
        batch = self.collate_fn([self.items[j] for j in indices])
        batch["counted"] = torch.tensor(float(counted))
        return batch


class FinetuneData(L.LightningDataModule):
    """This rank's micro-batches of a fixed step plan (built the same on every rank)."""

    def __init__(self, items: list, plan: list, collate_fn, num_workers: int = 0) -> None:
        super().__init__()
        self.items, self.plan, self.collate_fn, self.num_workers = items, plan, collate_fn, num_workers

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self):
        from danube.data.sft import StepBatches

        dataset = StepBatches(self.items, self.plan, self._rank()[0], self.collate_fn)
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers)


class FinetuneDataWithValidation(FinetuneData):
    """The same, plus the held-out items (Lightning validates only where ``val_dataloader`` exists)."""

    def __init__(self, items: list, plan: list, collate_fn, val_items: list, micro_batch_size: int,
                 num_workers: int = 0) -> None:
        super().__init__(items, plan, collate_fn, num_workers)
        self.val_items, self.micro_batch_size = val_items, micro_batch_size

    def val_dataloader(self):
        rank, ws = self._rank()
        dataset = MicroBatches(self.val_items, self.micro_batch_size, rank, ws, self.collate_fn)
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
    from danube.data.sft import micro_batches_per_step

    sources = validate(cfg)
    tok = load_tokenizer(cfg)
    ws = world_size(cfg.trainer)
    accumulate = micro_batches_per_step(int(cfg.train.batch_size), int(cfg.train.micro_batch_size), ws)
    run_dir = resolve_run_dir(cfg)
    check_output(cfg, run_dir)
    with rundir.lock(run_dir, what="fine-tuning run"):
        log_file = None
        if rundir.is_rank_zero():
            entry = rundir.record_invocation(run_dir, OmegaConf.to_container(cfg, resolve=True), [])
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
    from danube.data.sft import step_plan

    L.seed_everything(int(cfg.seed), workers=True)

    items, val_items, collate_fn, counts = build_items(cfg, sources, tok)
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
    data = (FinetuneDataWithValidation(items, plan, collate_fn, val_items, mbs, num_workers) if val_items
            else FinetuneData(items, plan, collate_fn, num_workers))
    with warnings.catch_warnings():
        # Without held-out items there is no val_dataloader, by design.
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`")
        trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if val_items and module.last_val_step != trainer.global_step and trainer.limit_val_batches != 0:
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
