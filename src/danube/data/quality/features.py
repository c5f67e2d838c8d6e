"""Cheap per-document features for the gradient-boosting quality classifier.

The heuristic statistics (:func:`danube.data.quality.heuristics.document_stats`) plus
character-class ratios, line shape and a few web-boilerplate signals. A saved classifier
records :data:`FEATURE_VERSION` and :data:`FEATURE_NAMES`; change either whenever a
feature's definition changes, so an old model is refused instead of silently mis-scored.
"""

from __future__ import annotations

import math
import re
import unicodedata

import numpy as np

from danube.data.quality.heuristics import STAT_NAMES, document_stats

FEATURE_VERSION = 1

# Lines with these are menus, consent banners and footers more often than prose (C4
# drops lines mentioning javascript or cookie policies; the rest are of the same kind).
BOILERPLATE = re.compile(
    r"cookie|javascript|privacy policy|terms of (use|service)|all rights reserved|sign in|log in|"
    r"subscribe|newsletter|click here|read more|share on|follow us",
    re.IGNORECASE,
)
_URL = re.compile(r"https?://|www\.")
_TERMINAL = (".", "!", "?", '"', "'", "”", ")")

_EXTRA_NAMES = (
    "log_chars", "upper_frac", "lower_frac", "digit_frac", "space_frac", "punct_frac", "non_ascii_frac",
    "control_frac", "n_lines", "mean_line_len", "short_line_frac", "terminal_punct_line_frac",
    "unique_word_frac", "boilerplate_line_frac", "url_per_word", "curly_brace_frac", "max_word_len",
)
FEATURE_NAMES: tuple[str, ...] = STAT_NAMES + _EXTRA_NAMES


def _extra(text: str) -> dict[str, float]:
    n = len(text)
    counts = dict.fromkeys(("upper", "lower", "digit", "space", "punct", "non_ascii", "control"), 0)
    for c in text:
        if c.isupper():
            counts["upper"] += 1
        elif c.islower():
            counts["lower"] += 1
        elif c.isdigit():
            counts["digit"] += 1
        elif c.isspace():
            counts["space"] += 1
        elif unicodedata.category(c).startswith(("P", "S")):
            counts["punct"] += 1
        elif unicodedata.category(c).startswith("C"):
            counts["control"] += 1
        if ord(c) > 127:
            counts["non_ascii"] += 1
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    words = text.split()
    n_lines, n_words = len(lines), len(words)
    return {
        "log_chars": math.log1p(n),
        **{f"{k}_frac": v / n if n else 0.0 for k, v in counts.items()},
        "n_lines": float(n_lines),
        "mean_line_len": sum(map(len, lines)) / n_lines if n_lines else 0.0,
        "short_line_frac": sum(len(line) < 30 for line in lines) / n_lines if n_lines else 0.0,
        "terminal_punct_line_frac": sum(line.endswith(_TERMINAL) for line in lines) / n_lines if n_lines else 0.0,
        "unique_word_frac": len({w.lower() for w in words}) / n_words if n_words else 0.0,
        "boilerplate_line_frac": sum(bool(BOILERPLATE.search(line)) for line in lines) / n_lines if n_lines else 0.0,
        "url_per_word": len(_URL.findall(text)) / n_words if n_words else 0.0,
        "curly_brace_frac": (text.count("{") + text.count("}")) / n if n else 0.0,
        "max_word_len": float(max(map(len, words), default=0)),
    }


def document_features(text: str, stats: dict[str, float] | None = None) -> dict[str, float]:
    """All features of one document by name; pass ``stats`` when the heuristics already measured it."""
    return {**(stats if stats is not None else document_stats(text)), **_extra(text)}


def feature_matrix(texts: list[str], stats: list[dict[str, float]] | None = None) -> np.ndarray:
    """``(len(texts), len(FEATURE_NAMES))`` float64 matrix, columns in :data:`FEATURE_NAMES` order."""
    rows = [document_features(t, None if stats is None else stats[i]) for i, t in enumerate(texts)]
    return np.array([[row[name] for name in FEATURE_NAMES] for row in rows], dtype=np.float64).reshape(
        len(texts), len(FEATURE_NAMES)
    )
