"""Labelled documents made here, no download: prose bundled with CPython and generated junk.

The tests train and check the quality layers on these, and ``danube quality sample`` writes
them out so the README's commands run on any machine: ``good.jsonl`` (prose), ``junk.jsonl``
(random characters, symbol soup, scraped boilerplate, repetition) and ``web.jsonl`` (both,
shuffled, standing in for raw web text to filter).
"""

from __future__ import annotations

import random
import re
import string
from pathlib import Path

from danube.data.records import write_jsonl

_CODE = re.compile(r">>>|::=|\||\.\.\.|^\s*[-*]")


def prose_lines() -> list[str]:
    """pydoc lines that read as English sentences (no code, grammar or tables)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    wordy = [line for line in text.splitlines() if len(line.split()) > 3]
    out = []
    for line in wordy[:20_000]:
        words = line.split()
        wordy = sum(w.isalpha() or w[:-1].isalpha() for w in words) / len(words)
        if wordy >= 0.85 and not _CODE.search(line):
            out.append(line.strip())
    return out


def clean_docs(n: int, offset: int = 0, lines_per_doc: int = 12) -> list[str]:
    """``n`` distinct prose documents (~120 words each), starting at document ``offset``."""
    lines = prose_lines()
    docs = []
    for i in range(offset, offset + n):
        start = i * lines_per_doc
        if start + lines_per_doc > len(lines):
            raise ValueError(f"only {len(lines) // lines_per_doc} prose documents of {lines_per_doc} lines")
        docs.append("\n".join(lines[start : start + lines_per_doc]))
    return docs


def random_chars(rng: random.Random, words: int = 120) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation
    return " ".join("".join(rng.choices(alphabet, k=rng.randint(2, 14))) for _ in range(words))


def symbol_soup(rng: random.Random, words: int = 120) -> str:
    return " ".join("".join(rng.choices("#$%&*@!{}[]<>~^|+=/\\", k=rng.randint(1, 6))) for _ in range(words))


MENU = ["Home", "About us", "Products", "Blog", "Contact", "Careers", "Log in", "Sign up"]
COOKIE = "We use cookies to improve your experience. By using this site you accept our cookie policy."


def boilerplate(rng: random.Random) -> str:
    """A navigation menu and a cookie banner, repeated as scraped page furniture is."""
    lines = []
    for _ in range(rng.randint(4, 8)):
        lines += [f"- {item}" for item in rng.sample(MENU, k=5)]
        lines.append(COOKIE)
        lines.append("Read more...")
    return "\n".join(lines)


def repetition(rng: random.Random, lines: list[str]) -> str:
    """One prose line said over and over."""
    line = rng.choice(lines)
    return "\n".join([line] * rng.randint(8, 15))


def word_salad(rng: random.Random, lines: list[str]) -> str:
    """Prose words in random order: plausible statistics, no sentences."""
    words = " ".join(rng.sample(lines, k=12)).split()
    rng.shuffle(words)
    return " ".join(words)


def junk_docs(n: int, seed: int, kinds: tuple[str, ...] = ("chars", "symbols", "boilerplate", "repetition"),
              ) -> list[str]:
    """``n`` generated bad documents, the ``kinds`` in turn."""
    rng = random.Random(seed)
    lines = prose_lines()
    make = {
        "chars": lambda: random_chars(rng),
        "symbols": lambda: symbol_soup(rng),
        "boilerplate": lambda: boilerplate(rng),
        "repetition": lambda: repetition(rng, lines),
        "salad": lambda: word_salad(rng, lines),
    }
    return [make[kinds[i % len(kinds)]]() for i in range(n)]


def write_sample(out_dir: str | Path, n_good: int = 150, n_junk: int = 150, seed: int = 0) -> dict[str, Path]:
    """Write ``good.jsonl``, ``junk.jsonl`` and their shuffled union ``web.jsonl`` (``{"text": ...}`` lines)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    good = clean_docs(n_good)
    junk = junk_docs(n_junk, seed, kinds=("chars", "symbols", "boilerplate", "repetition", "salad"))
    web = [*good, *junk]
    random.Random(seed).shuffle(web)
    return {name: write_jsonl(({"text": d} for d in docs), out_dir / f"{name}.jsonl")
            for name, docs in (("good", good), ("junk", junk), ("web", web))}
