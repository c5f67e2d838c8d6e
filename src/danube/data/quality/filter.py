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

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from danube.data.quality import classifier
from danube.data.quality.gbm import GBMScorer
from danube.data.quality.heuristics import HeuristicRules, document_stats

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
    tasks: int | None = None,
    skip_bad: bool = False,
    executor: str = "local",
    slurm: dict | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Filter ``inputs`` into ``output``; returns the report (also written by :func:`report_path`).

    A datatrove pipeline (:func:`danube.corpus.quality.filter_corpus`): reader, these layers, a
    writer of the kept records, over tasks; the same command after a kill goes on.

    Args:
        inputs: Files, directories, globs or URLs of ``.jsonl(.gz/.zst)``, ``.parquet``, ``.txt``
            (:mod:`danube.corpus.inputs`), one document per record in ``text_field_name``.
        output: The kept records: a ``.jsonl`` file, or a directory of ``kept/`` and ``rejected/``
            ``.jsonl.zst`` parts (one per task) with ``quality.json``.
        rules: Heuristic thresholds; ``None`` skips the rule layer.
        gbm: A GBM classifier directory (or loaded scorer); ``None`` skips the layer.
        gbm_threshold: Keep documents whose GBM probability of being good is at least this.
        transformer: A transformer classifier directory (danube or local Hugging Face), or scorer.
        transformer_threshold: Keep documents scoring at least this.
        rejected: Optional ``.jsonl`` of the dropped records with the reason.
        tokenizer: SentencePiece model: counts become tokens, and needed for ``shards``.
        shards: Optional directory for litdata pretraining shards of the kept documents.
        val_fraction: Passed to :func:`danube.corpus.prepare.prepare` for ``shards``.
        num_workers: Tasks run at once (and ``prepare``'s workers for ``shards``).
        batch_size: Documents scored together.
        hf_label: For a Hugging Face classifier, the index of the "good" label.
        overwrite: Replace existing outputs (only once the new ones are complete).
        tasks, skip_bad, executor, slurm, verbose: as :func:`danube.corpus.prepare.prepare`'s.

    Raises:
        ValueError: Bad arguments or a classifier of the wrong kind, before any data is read;
            a malformed record (``FILE:LINE: what``), before any output is written.
    """
    from danube.corpus.quality import filter_corpus

    return filter_corpus(inputs, output, text_field_name, rules, gbm, gbm_threshold, transformer,
                         transformer_threshold, rejected, tokenizer, shards, val_fraction, num_workers, batch_size,
                         hf_label, overwrite, tasks, skip_bad, executor, slurm, verbose)


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
