"""Pretraining-data quality filtering the way H2O-Danube2 did it: heuristics, then small classifiers.

- :mod:`~danube.data.quality.heuristics`: Gopher / C4 rules with overridable thresholds.
- :mod:`~danube.data.quality.features` and :mod:`~danube.data.quality.gbm`: a
  gradient-boosting classifier on cheap text features.
- :mod:`~danube.data.quality.transformer`: a small danube transformer classifier (or a
  local Hugging Face one).
- :mod:`~danube.data.quality.filter`: the three layers and their report;
  :func:`danube.corpus.quality.filter_documents` runs them over a corpus as a datatrove
  pipeline; ``danube quality`` is its command line.
"""

from danube.corpus.quality import filter_documents
from danube.data.quality.heuristics import HeuristicRules, document_stats

__all__ = ["HeuristicRules", "document_stats", "filter_documents"]
