import random
from collections import Counter

import pytest

from danube.data.quality.heuristics import GOPHER_RULES, HeuristicRules, document_stats
from tests.data.quality_texts import boilerplate, clean_docs, junk_docs, prose_lines

RULES = HeuristicRules()


def failures(text: str, rules: HeuristicRules = RULES) -> list[str]:
    return rules.failures(document_stats(text))


@pytest.fixture(scope="module")
def base() -> str:
    """A prose document that breaks no rule: each mutation below breaks one on purpose."""
    return next(d for d in clean_docs(20) if not failures(d))


def _words(text):
    return text.split()


# rule -> how to turn a clean document into one that breaks it
MUTATIONS = {
    "min_words": lambda d: " ".join(_words(d)[:30]),
    "min_mean_word_len": lambda d: " ".join(["the", "of", "to", "and"] + ["a", "is", "it", "an", "be"] * 40),
    "max_mean_word_len": lambda d: " ".join(w * 4 for w in _words(d)),
    "max_symbol_word_ratio": lambda d: " ".join(w + (" #tag" if i % 3 == 0 else "") for i, w in enumerate(_words(d))),
    "max_bullet_line_frac": lambda d: "\n".join("• " + line for line in d.splitlines()),
    "max_ellipsis_line_frac": lambda d: "\n".join(line.rstrip(".") + "…" for line in d.splitlines()),
    "min_alpha_word_frac": lambda d: " ".join(f"{w} {i} {i * 7}" for i, w in enumerate(_words(d))),
    "min_stop_words": lambda d: " ".join(w for w in _words(d) if w.lower().strip(".,;:") not in
                                         {"the", "be", "to", "of", "and", "that", "have", "with"}),
    "max_dup_line_frac": lambda d: "\n".join(d.splitlines() + ["Accept all cookies"] * 12),
    "max_dup_line_char_frac": lambda d: "\n".join(d.splitlines() + d.splitlines()[:6]),
    # a one-line paragraph, said four times, next to the rest
    "max_dup_para_frac": lambda d: "\n\n".join([*[d.splitlines()[0]] * 4, "\n".join(d.splitlines()[1:])]),
    "max_dup_para_char_frac": lambda d: d + "\n\n" + d,
    "max_top_2gram_frac": lambda d: d + "\n" + " ".join(["click here"] * 60),
    "max_top_3gram_frac": lambda d: d + "\n" + " ".join(["buy it now"] * 40),
    "max_top_4gram_frac": lambda d: d + "\n" + " ".join(["add to your cart"] * 25),
    **{f"max_dup_{n}gram_frac": (lambda d: d + "\n" + d) for n in range(5, 11)},
    "reject_lorem_ipsum": lambda d: d + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
}


def test_every_rule_has_a_mutation():
    assert set(MUTATIONS) == set(HeuristicRules.rule_names()) - {"max_words"}


@pytest.mark.parametrize("rule", sorted(MUTATIONS))
def test_rule_fires_on_its_mutation(rule, base):
    assert rule in failures(MUTATIONS[rule](base))


def test_max_words_fires_above_its_threshold(base):
    n = len(base.split())
    assert "max_words" in failures(base, HeuristicRules(max_words=n - 1))
    assert "max_words" not in failures(base, HeuristicRules(max_words=n))


def test_clean_prose_is_kept():
    docs = clean_docs(200)
    fired = Counter(rule for d in docs for rule in failures(d))
    kept = sum(not failures(d) for d in docs)
    # Technical prose repeats phrases ("the value of the"): Gopher's repetition rules may
    # catch a few short documents, the other rules none.
    assert kept >= 0.92 * len(docs), fired
    assert all(n <= 0.04 * len(docs) for n in fired.values()), fired
    assert set(fired) <= {r for r in HeuristicRules.rule_names() if "gram" in r}, fired


@pytest.mark.parametrize("kind, expected", [
    ("chars", {"min_stop_words"}),
    ("symbols", {"min_alpha_word_frac", "min_stop_words", "max_symbol_word_ratio"}),
    ("boilerplate", {"max_dup_line_frac", "max_dup_line_char_frac", "min_stop_words"}),
    ("repetition", {"max_dup_line_frac", "max_top_3gram_frac", "max_dup_10gram_frac"}),
])
def test_generated_junk_is_dropped_by_the_rules_for_its_kind(kind, expected):
    for doc in junk_docs(10, seed=3, kinds=(kind,)):
        assert expected <= set(failures(doc)), (doc[:200], failures(doc))


def test_statistics_on_small_known_texts():
    s = document_stats("alpha beta\ngamma\nalpha beta\nalpha beta")
    assert s["n_words"] == 7 and s["dup_line_frac"] == 0.5
    assert s["dup_line_char_frac"] == pytest.approx(20 / 35)
    # "alpha beta" x3 is the top 2-gram: 3 x 9 of the 32 characters in words
    assert s["top_2gram_frac"] == pytest.approx(27 / 32)
    s = document_stats("one two three four five. One two three four five!")
    # the second "one two three four five" repeats the first: half the word characters
    assert s["dup_5gram_frac"] == pytest.approx(0.5)
    assert s["dup_6gram_frac"] == 0.0
    s = document_stats("• a\n- b\nc...\nd")
    assert s["bullet_line_frac"] == 0.5 and s["ellipsis_line_frac"] == 0.25
    assert document_stats("")["n_words"] == 0 and failures("") == ["min_words", "min_mean_word_len",
                                                                   "min_alpha_word_frac", "min_stop_words"]


def test_boilerplate_menu_lines_start_with_bullets():
    doc = boilerplate(random.Random(0))
    assert document_stats(doc)["bullet_line_frac"] > 0.5


def test_thresholds_load_from_yaml_and_overrides(tmp_path):
    assert GOPHER_RULES.is_file() and HeuristicRules.load(GOPHER_RULES) == HeuristicRules()
    rules = HeuristicRules.load(None, ["min_words=20", "reject_lorem_ipsum=false", "max_dup_5gram_frac=0.5"])
    assert (rules.min_words, rules.reject_lorem_ipsum, rules.max_dup_5gram_frac) == (20, False, 0.5)
    (tmp_path / "r.yaml").write_text("min_words: 10\nmax_word: 5\n")
    with pytest.raises(ValueError, match=r"r.yaml: unknown heuristic rules \['max_word'\]"):
        HeuristicRules.load(tmp_path / "r.yaml")
    with pytest.raises(ValueError, match="max_dup_line_frac=1.5 is a fraction"):
        HeuristicRules(max_dup_line_frac=1.5)
    with pytest.raises(ValueError, match="min_words=200 > max_words=100"):
        HeuristicRules(min_words=200, max_words=100)
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        HeuristicRules.load(None, ["min_words"])
    with pytest.raises(FileNotFoundError, match="rules file not found"):
        HeuristicRules.load(tmp_path / "missing.yaml")


def test_prose_lines_are_plenty():
    assert len(prose_lines()) >= 12 * 300
