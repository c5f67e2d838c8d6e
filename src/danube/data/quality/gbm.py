"""Gradient-boosted trees on cheap text features (scikit-learn's HistGradientBoostingClassifier).

H2O-Danube2 (report, section 7) scored its pretraining data with a GBM among other small
models. Ours is trained on two labelled sets of documents, e.g. curated text as positive
and raw web as negative, and saved as a classifier directory::

    MODEL/quality_classifier.json   kind "gbm", feature version and names, held-out metrics
    MODEL/gbm.pkl                   the fitted estimator (pickle: load only files you trust)
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from danube.data.quality import classifier
from danube.data.quality.features import FEATURE_NAMES, FEATURE_VERSION, feature_matrix

log = logging.getLogger(__name__)

MODEL_FILE = "gbm.pkl"


@dataclass
class GBMScorer:
    """A fitted classifier with the feature definition it was trained on."""

    model: object
    path: Path | None = None
    meta: dict | None = None
    kind: str = "gbm"

    def score(self, texts: list[str], stats: list[dict[str, float]] | None = None) -> np.ndarray:
        """Probability of the positive (good) class per text; ``stats`` reuses heuristic statistics."""
        if not texts:
            return np.zeros(0)
        return self.model.predict_proba(feature_matrix(texts, stats))[:, 1]

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        meta = {**(meta or self.meta or {}), "kind": "gbm", "feature_version": FEATURE_VERSION,
                "feature_names": list(FEATURE_NAMES), "sklearn_version": _sklearn_version()}

        def write(tmp: Path) -> None:
            with open(tmp / MODEL_FILE, "wb") as f:
                pickle.dump(self.model, f, protocol=pickle.HIGHEST_PROTOCOL)

        self.path = classifier.write_dir(path, meta, write)
        self.meta = meta
        log.info("wrote GBM quality classifier %s", self.path)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> "GBMScorer":
        from sklearn.ensemble import HistGradientBoostingClassifier

        path = Path(path)
        meta = classifier.read_meta(path, "gbm")
        if meta.get("feature_version") != FEATURE_VERSION or meta.get("feature_names") != list(FEATURE_NAMES):
            saved = meta.get("feature_names") or []
            raise ValueError(
                f"{path}: trained on feature version {meta.get('feature_version')} ({len(saved)} features), this "
                f"danube computes version {FEATURE_VERSION} ({len(FEATURE_NAMES)} features; differ: "
                f"{sorted(set(saved) ^ set(FEATURE_NAMES))[:6]}); retrain it with `danube quality train-gbm`"
            )
        if meta.get("sklearn_version") != _sklearn_version():
            log.warning("%s was saved with scikit-learn %s, this is %s", path, meta.get("sklearn_version"),
                        _sklearn_version())
        file = path / MODEL_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{path}: {MODEL_FILE} is missing")
        with open(file, "rb") as f:
            try:
                model = pickle.load(f)
            except Exception as err:  # unpickling raises many types for a damaged file
                raise ValueError(f"{file}: not a readable pickled classifier: {err}") from err
        if not isinstance(model, HistGradientBoostingClassifier) or model.n_features_in_ != len(FEATURE_NAMES):
            raise ValueError(f"{file}: expected a HistGradientBoostingClassifier over {len(FEATURE_NAMES)} features, "
                             f"got {type(model).__name__}")
        return cls(model, path, meta)


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def train_gbm(
    texts: list[str],
    labels: np.ndarray,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 200,
    learning_rate: float = 0.1,
    max_leaf_nodes: int = 31,
) -> tuple[GBMScorer, dict]:
    """Fit on a stratified split of ``texts``; returns the scorer and its train/val metrics.

    Defaults are scikit-learn's, except ``max_iter`` (200 rounds: the features are few and
    the fit takes seconds on a few thousand documents).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    train_idx, val_idx = classifier.split(len(texts), labels, val_fraction, seed)
    features = feature_matrix(texts)
    model = HistGradientBoostingClassifier(
        max_iter=max_iter, learning_rate=learning_rate, max_leaf_nodes=max_leaf_nodes, random_state=seed,
    )
    model.fit(features[train_idx], labels[train_idx])
    scorer = GBMScorer(model)
    report = {
        "positive": int(labels.sum()), "negative": int(len(labels) - labels.sum()),
        "train": classifier.metrics(labels[train_idx], model.predict_proba(features[train_idx])[:, 1]),
    }
    if len(val_idx):
        report["val"] = classifier.metrics(labels[val_idx], model.predict_proba(features[val_idx])[:, 1])
    log.info("GBM quality classifier: %s", report)
    return scorer, report

