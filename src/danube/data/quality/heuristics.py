"""Rule-based document filters in the spirit of Gopher (MassiveText) and C4.

:func:`document_stats` measures a document once; :class:`HeuristicRules` holds the
thresholds (dataclass fields, Gopher-like defaults) and :meth:`HeuristicRules.failures`
names every rule a document breaks. The same statistics are the first features of the
gradient-boosting classifier (:mod:`danube.data.quality.features`).

Default thresholds: Rae et al. 2021 ("Scaling Language Models: Methods, Analysis &
Insights from Training Gopher"), appendix A.1.1 (quality filters) and table A1
(repetition filters); the lorem-ipsum rule is C4's (Raffel et al. 2020, section 2.2).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every rule at its default, with where its threshold comes from (package data: an installed danube has it too).
GOPHER_RULES = Path(__file__).with_name("gopher.yaml")

# Gopher's stop-word rule: a document must contain at least two of these.
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "·", "‣", "◦", "▪", "–", "—", "►", "○")
ELLIPSES = ("...", "…")
TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)

_PARAGRAPH_SPLIT = re.compile(r"\n[ \t\r\f\v]*\n")
# Punctuation stripped from word edges before n-gram and stop-word matching, so that
# "the," and "the" are the same word.
_EDGE_PUNCT = "".join(chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()) + "“”‘’«»…–—"


def _words(text: str) -> tuple[list[str], list[str]]:
    """Whitespace words as written, and lowercased with edge punctuation stripped."""
    raw = text.split()
    norm = [w.strip(_EDGE_PUNCT).lower() for w in raw]
    return raw, norm


def _duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    total_chars = sum(map(len, items))
    return dup_items / len(items), dup_chars / max(total_chars, 1)


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters in every occurrence of the most frequent word n-gram / characters in all words."""
    if len(words) < n or total_chars == 0:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / total_chars


def _dup_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters of the words inside a repeat of an earlier word n-gram / characters in all words.

    The first occurrence is not counted: a passage written twice is half duplicate.
    """
    if len(words) < n or total_chars == 0:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i, gram in enumerate(zip(*(words[i:] for i in range(n)))):
        if gram in seen:
            covered[i : i + n] = [True] * n
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def document_stats(text: str) -> dict[str, float]:
    """Every statistic the rules threshold, as a flat ``name -> number`` mapping."""
    raw, norm = _words(text)
    n_words = len(raw)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    paragraphs = [p.strip() for p in _PARAGRAPH_SPLIT.split(text) if p.strip()]
    norm_words = [w for w in norm if w]
    ngram_chars = sum(map(len, norm_words))
    dup_line, dup_line_chars = _duplicate_fractions(lines)
    dup_para, dup_para_chars = _duplicate_fractions(paragraphs)
    symbols = text.count("#") + text.count("...") + text.count("…")
    stats: dict[str, float] = {
        "n_words": float(n_words),
        "mean_word_len": sum(map(len, raw)) / n_words if n_words else 0.0,
        "symbol_word_ratio": symbols / n_words if n_words else 0.0,
        "bullet_line_frac": sum(line.startswith(BULLETS) for line in lines) / len(lines) if lines else 0.0,
        "ellipsis_line_frac": sum(line.endswith(ELLIPSES) for line in lines) / len(lines) if lines else 0.0,
        "alpha_word_frac": sum(any(c.isalpha() for c in w) for w in raw) / n_words if n_words else 0.0,
        "stop_words": float(len(STOP_WORDS.intersection(norm))),
        "dup_line_frac": dup_line,
        "dup_line_char_frac": dup_line_chars,
        "dup_para_frac": dup_para,
        "dup_para_char_frac": dup_para_chars,
        "lorem_ipsum": float("lorem ipsum" in text.lower()),
    }
    for n in TOP_NGRAMS:
        stats[f"top_{n}gram_frac"] = _top_ngram_fraction(norm_words, n, ngram_chars)
    for n in DUP_NGRAMS:
        stats[f"dup_{n}gram_frac"] = _dup_ngram_fraction(norm_words, n, ngram_chars)
    return stats


STAT_NAMES: tuple[str, ...] = tuple(document_stats("a b"))


@dataclass
class HeuristicRules:
    """Thresholds of the rule filter; a document is kept when it breaks none.

    Field names say the direction: ``min_*`` fails below, ``max_*`` fails above. Each
    field is one rule and names the statistic of :func:`document_stats` it reads.
    """

    # Gopher: 50 <= words <= 100,000; mean word length 3..10 characters.
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    # Gopher: symbol (#, ellipsis) to word ratio <= 0.1.
    max_symbol_word_ratio: float = 0.1
    # Gopher: <= 90% of lines start with a bullet, <= 30% end with an ellipsis.
    max_bullet_line_frac: float = 0.9
    max_ellipsis_line_frac: float = 0.3
    # Gopher: >= 80% of words contain an alphabetic character.
    min_alpha_word_frac: float = 0.8
    # Gopher: at least two of the, be, to, of, and, that, have, with.
    min_stop_words: int = 2
    # Gopher table A1: duplicate lines / paragraphs (by count and by characters).
    max_dup_line_frac: float = 0.30
    max_dup_para_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    # Gopher table A1: characters in the most frequent 2/3/4-gram.
    max_top_2gram_frac: float = 0.20
    max_top_3gram_frac: float = 0.18
    max_top_4gram_frac: float = 0.16
    # Gopher table A1: characters in duplicated 5..10-grams.
    max_dup_5gram_frac: float = 0.15
    max_dup_6gram_frac: float = 0.14
    max_dup_7gram_frac: float = 0.13
    max_dup_8gram_frac: float = 0.12
    max_dup_9gram_frac: float = 0.11
    max_dup_10gram_frac: float = 0.10
    # C4: drop any page with "lorem ipsum".
    reject_lorem_ipsum: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "reject_lorem_ipsum":
                if not isinstance(value, bool):
                    raise ValueError(f"HeuristicRules.reject_lorem_ipsum={value!r} must be true or false")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"HeuristicRules.{f.name}={value!r} must be a non-negative number")
            if f.name.endswith("_frac") and value > 1:
                raise ValueError(f"HeuristicRules.{f.name}={value!r} is a fraction: it must be in [0, 1]")
        if self.min_words > self.max_words:
            raise ValueError(f"HeuristicRules: min_words={self.min_words} > max_words={self.max_words}")
        if self.min_mean_word_len > self.max_mean_word_len:
            raise ValueError(f"HeuristicRules: min_mean_word_len={self.min_mean_word_len} > "
                             f"max_mean_word_len={self.max_mean_word_len}")

    @staticmethod
    def rule_names() -> list[str]:
        return [f.name for f in dataclasses.fields(HeuristicRules)]

    def failures(self, stats: dict[str, float]) -> list[str]:
        """The rules (field names) that ``stats`` breaks, in field order."""
        failed = []
        for name in self.rule_names():
            value = getattr(self, name)
            if name == "reject_lorem_ipsum":
                if value and stats["lorem_ipsum"]:
                    failed.append(name)
            elif name.startswith("min_") and stats[_STAT_OF[name]] < value:
                failed.append(name)
            elif name.startswith("max_") and stats[_STAT_OF[name]] > value:
                failed.append(name)
        return failed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "rules") -> "HeuristicRules":
        known = set(cls.rule_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown heuristic rules {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "HeuristicRules":
        """Rules from a YAML mapping of fields (``path``, may be None) then ``NAME=VALUE`` overrides."""
        import yaml

        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"rules file not found: {path}")
            loaded = yaml.safe_load(path.read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of HeuristicRules fields, got {type(loaded).__name__}")
            values.update(cls.from_dict(loaded, str(path)).to_dict())
        for item in overrides or []:
            name, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"--rule {item!r}: expected NAME=VALUE")
            values[name.strip()] = yaml.safe_load(raw)
        return cls.from_dict(values, "--rule")


# Which statistic each threshold reads: the field name minus its min_/max_ prefix.
_STAT_OF = {
    name: name[4:] for name in HeuristicRules.rule_names() if name.startswith(("min_", "max_"))
}
_STAT_OF["min_words"] = _STAT_OF["max_words"] = "n_words"
assert set(_STAT_OF.values()) <= set(STAT_NAMES), sorted(set(_STAT_OF.values()) - set(STAT_NAMES))
