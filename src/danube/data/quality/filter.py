"""Score and filter ``.jsonl`` documents through up to three layers, then optionally tokenize.

Layers run in order and each sees only what the previous kept: the heuristic rules
(cheapest), the GBM, the transformer classifier. Every output record is the input record
plus a ``quality`` field with what each layer measured::

    {"text": "...", "id": 7, "quality": {"heuristics": {"failed": [], "n_words": 212.0, ...},
                                         "gbm": 0.97, "transformer": 0.91, "kept": true}}

Dropped records go to the optional rejected file with ``quality.reason``. The report
(JSON next to the output, also returned) counts documents and tokens (whitespace words,
or tokenizer tokens when a tokenizer is given) each layer saw and kept, and per rule how
many documents broke it. With ``shards`` the kept documents are tokenized by
:func:`danube.data.prepare.prepare` into pretraining shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from danube.data.quality import classifier
from danube.data.quality.gbm import GBMScorer
from danube.data.quality.heuristics import HeuristicRules, document_stats
from danube.data.records import read_jsonl, require, text_field
from danube.files import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

REPORT_FORMAT = "danube-quality-report/1"


def report_path(output: str | Path) -> Path:
    """Where the report of ``output`` goes: ``kept.jsonl`` -> ``kept.quality.json``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".quality.json")


@dataclass
class _Count:
    documents: int = 0
    tokens: int = 0

    def add(self, tokens: int) -> None:
        self.documents += 1
        self.tokens += tokens


@dataclass
class _Layer:
    name: str
    seen: _Count = field(default_factory=_Count)
    kept: _Count = field(default_factory=_Count)
    info: dict[str, Any] = field(default_factory=dict)
    failed_by_rule: dict[str, int] = field(default_factory=dict)
    score_sum: float = 0.0
    scorer: Any = None  # the classifier layers' Scorer
    threshold: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {"layer": self.name, **self.info, "seen": vars(self.seen), "kept": vars(self.kept),
               "dropped": {"documents": self.seen.documents - self.kept.documents,
                           "tokens": self.seen.tokens - self.kept.tokens}}
        if self.name == "heuristics":
            out["failed_by_rule"] = self.failed_by_rule
        elif self.seen.documents:
            out["mean_score"] = round(self.score_sum / self.seen.documents, 6)
        return out


def _records(files: list[Path], field_name: str) -> Iterator[tuple[dict, str]]:
    for file in files:
        for lineno, record in read_jsonl(file):
            where = f"{file}:{lineno}"
            require(record, (field_name,), where, "document")
            yield record, text_field(record, field_name, where)


def _batches(it: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _apply(layer: _Layer, alive: list[int], texts: list[str], stats: list, quality: list[dict],
           rules: HeuristicRules | None) -> list[int]:
    """Run one layer on the documents ``alive``; fills ``quality`` (and ``stats``), returns those kept."""
    survivors = []
    if layer.name == "heuristics":
        for i in alive:
            stats[i] = document_stats(texts[i])
            failed = rules.failures(stats[i])
            quality[i]["heuristics"] = {"failed": failed, **{k: round(v, 4) for k, v in stats[i].items()}}
            for rule in failed:
                layer.failed_by_rule[rule] += 1
            if failed:
                quality[i]["reason"] = f"heuristics: {', '.join(failed)}"
            else:
                survivors.append(i)
        return survivors
    if isinstance(layer.scorer, GBMScorer) and rules is not None:
        # The rules measured these documents already: the GBM's first features.
        scores = layer.scorer.score([texts[i] for i in alive], [stats[i] for i in alive])
    else:
        scores = layer.scorer.score([texts[i] for i in alive])
    layer.score_sum += float(np.sum(scores))
    for i, s in zip(alive, scores):
        quality[i][layer.name] = round(float(s), 6)
        if s >= layer.threshold:
            survivors.append(i)
        else:
            quality[i]["reason"] = f"{layer.name}: score {s:.4f} < {layer.threshold}"
    return survivors


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must be a probability in [0, 1]")


def filter_documents(
    inputs: list[str | Path],
    output: str | Path,
    text_field_name: str = "text",
    rules: HeuristicRules | None = None,
    gbm: str | Path | classifier.Scorer | None = None,
    gbm_threshold: float = 0.5,
    transformer: str | Path | classifier.Scorer | None = None,
    transformer_threshold: float = 0.5,
    rejected: str | Path | None = None,
    tokenizer: str | Path | None = None,
    shards: str | Path | None = None,
    val_fraction: float = 0.01,
    num_workers: int = 1,
    batch_size: int = 256,
    hf_label: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Filter ``inputs`` into ``output``; returns the report (also written by :func:`report_path`).

    Args:
        inputs: ``.jsonl`` files, one document per record in ``text_field_name``.
        output: The kept records (``.jsonl``).
        rules: Heuristic thresholds; ``None`` skips the rule layer.
        gbm: A GBM classifier directory (or loaded scorer); ``None`` skips the layer.
        gbm_threshold: Keep documents whose GBM probability of being good is at least this.
        transformer: A transformer classifier directory (danube or local Hugging Face), or scorer.
        transformer_threshold: Keep documents scoring at least this.
        rejected: Optional ``.jsonl`` of the dropped records with the reason.
        tokenizer: SentencePiece model: counts become tokens, and needed for ``shards``.
        shards: Optional directory for litdata pretraining shards of the kept documents.
        val_fraction, num_workers: Passed to :func:`danube.data.prepare.prepare` for ``shards``.
        batch_size: Documents scored together.
        hf_label: For a Hugging Face classifier, the index of the "good" label.
        overwrite: Replace existing outputs (only once the new ones are complete).

    Raises:
        ValueError: Bad arguments, a malformed record (``FILE:LINE: what``) or a classifier of
            the wrong kind, all before anything is written.
    """
    t0 = time.perf_counter()
    files = [Path(f) for f in inputs]
    output = Path(output)
    rejected = Path(rejected) if rejected is not None else None
    report_file = report_path(output)
    # ---- everything that can be wrong is checked before any output exists
    if not files:
        raise ValueError("no input files given")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"input not found: {f}")
        if not f.name.endswith(".jsonl"):
            raise ValueError(f"{f}: expected a .jsonl file")
    for path in (output, rejected):
        if path is not None and not path.name.endswith(".jsonl"):
            raise ValueError(f"{path}: outputs are .jsonl files")
    if rejected is not None and rejected.resolve() == output.resolve():
        raise ValueError(f"the rejected file and the output are the same file: {output}")
    if rules is None and gbm is None and transformer is None:
        raise ValueError("no layer to filter with: enable the heuristics or pass a GBM or transformer classifier")
    _check_threshold("gbm_threshold", gbm_threshold)
    _check_threshold("transformer_threshold", transformer_threshold)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shards is not None and tokenizer is None:
        raise ValueError("shards need a tokenizer (--tokenizer)")
    if not overwrite:
        for path in (output, rejected, report_file):
            if path is not None and path.exists():
                raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
        if shards is not None and Path(shards).exists() and (not Path(shards).is_dir() or any(Path(shards).iterdir())):
            raise FileExistsError(f"{shards} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    tok = None
    if tokenizer is not None:
        from danube.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
    if isinstance(gbm, (str, Path)):
        gbm = load_scorer(gbm, "gbm")
    if isinstance(transformer, (str, Path)):
        transformer = load_scorer(transformer, "transformer", hf_label=hf_label)
    n_docs = sum(1 for _ in _records(files, text_field_name))  # a bad record fails here, before any output
    log.info("filtering %d documents from %d files", n_docs, len(files))

    layers: list[_Layer] = []
    if rules is not None:
        layers.append(_Layer("heuristics", info={"rules": rules.to_dict()},
                             failed_by_rule=dict.fromkeys(rules.rule_names(), 0)))
    if gbm is not None:
        layers.append(_Layer("gbm", info={"model": str(gbm.path), "threshold": gbm_threshold},
                             scorer=gbm, threshold=gbm_threshold))
    if transformer is not None:
        layers.append(_Layer("transformer", info={"model": str(transformer.path), "threshold": transformer_threshold},
                             scorer=transformer, threshold=transformer_threshold))
    total, kept_total = _Count(), _Count()

    # Both outputs are written to temporary siblings and renamed into place at the end.
    with contextlib.ExitStack() as stack:
        tmp_rej = stack.enter_context(atomic_file(rejected)) if rejected is not None else None
        tmp_out = stack.enter_context(atomic_file(output))
        out_f = stack.enter_context(open(tmp_out, "w", encoding="utf-8"))
        rej_f = stack.enter_context(open(tmp_rej, "w", encoding="utf-8") if tmp_rej else open(os.devnull, "w"))
        for batch in _batches(_records(files, text_field_name), batch_size):
            texts = [t for _, t in batch]
            if tok is not None:
                lengths = [len(ids) for ids in tok.encode_batch(texts)]
            else:
                lengths = [len(t.split()) for t in texts]
            quality: list[dict[str, Any]] = [{} for _ in batch]
            stats: list[dict[str, float] | None] = [None] * len(batch)  # reused as GBM features
            alive = list(range(len(batch)))
            for n in lengths:
                total.add(n)
            for layer in layers:
                for i in alive:
                    layer.seen.add(lengths[i])
                if not alive:
                    continue
                survivors = _apply(layer, alive, texts, stats, quality, rules)
                for i in survivors:
                    layer.kept.add(lengths[i])
                alive = survivors
            keep = set(alive)
            for i, (record, _) in enumerate(batch):
                quality[i]["kept"] = i in keep
                line = json.dumps({**record, "quality": quality[i]}, ensure_ascii=False) + "\n"
                if i in keep:
                    kept_total.add(lengths[i])
                    out_f.write(line)
                else:
                    rej_f.write(line)

    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": [str(f) for f in files],
        "output": str(output),
        "rejected": str(rejected) if rejected is not None else None,
        "text_field": text_field_name,
        "token_unit": f"tokens of {tok.model_file}" if tok is not None else "whitespace words",
        "input": vars(total),
        "layers": [layer.to_dict() for layer in layers],
        "kept": vars(kept_total),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_text(report_file, json.dumps(report, indent=2) + "\n")
    log.info("kept %d of %d documents (%d of %d %s) in %s", kept_total.documents, total.documents,
             kept_total.tokens, total.tokens, report["token_unit"], output)
    if shards is not None:
        from danube.data.prepare import prepare

        manifest = prepare([output], shards, tok.model_file, text_field_name, val_fraction, num_workers,
                           overwrite=overwrite)
        report["shards"] = {"path": str(shards), "totals": manifest["totals"]}
        atomic_write_text(report_file, json.dumps(report, indent=2) + "\n")
    return report


def load_scorer(path: str | Path, expect: str, batch_size: int = 32, hf_label: int = 1,
                hf_max_tokens: int = 512) -> classifier.Scorer:
    """Load the classifier at ``path`` for the ``expect`` layer (``"gbm"`` or ``"transformer"``).

    ``hf_*`` apply to a Hugging Face directory only: which label is "good", and how many
    tokens of each document it reads. A local Hugging Face sequence-classification directory
    (``config.json``, no ``quality_classifier.json``) is accepted as a transformer scorer.
    """
    path = Path(path)
    if expect == "transformer" and path.is_dir() and not (path / classifier.META_FILE).is_file() \
            and (path / "config.json").is_file():
        from danube.data.quality.transformer import HFScorer

        return HFScorer(path, batch_size=batch_size, max_tokens=hf_max_tokens, label=hf_label)
    meta = classifier.read_meta(path, expect)
    if meta["kind"] == "gbm":
        return GBMScorer.load(path)
    from danube.data.quality.transformer import TransformerScorer

    return TransformerScorer.load(path, batch_size=batch_size)
