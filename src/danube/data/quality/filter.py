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
:func:`danube.corpus.prepare.prepare` into pretraining shards.
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
