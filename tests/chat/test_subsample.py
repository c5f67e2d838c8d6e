"""A chat_data source's max_rows or fraction: a seeded choice of its records, the same every load, counted, checked."""

import logging

import pytest

from danube.config import ChatSourceConfig
from danube.data.finetune import ItemSettings, Subsample, build_items, subsample
from danube.data.tokenizer import Tokenizer
from danube.tasks.finetune import open_sources, run
from tests.chat.conftest import compose_finetune, sft_records, write_jsonl

CPU = ["trainer=cpu", "precision=fp32", "export_hf=false", "train.max_seq_len=256"]


def answers(items, tok) -> list[str]:
    """What each tokenized SFT sample says (its trained tokens), to compare selections."""
    return [tok.decode([i for i in x.labels if i >= 0]) for x in items]


def load(files: dict, sp_model, seed: int = 42, **limits) -> tuple[list, dict]:
    """build_items of ``files`` (name -> path, in this order), each source with ``limits``."""
    sources = {name: ChatSourceConfig(path=str(path), format="messages", **limits) for name, path in files.items()}
    items, _, _, counts = build_items(open_sources(sources, "sft", seed), Tokenizer(sp_model),
                                      ItemSettings(loss="sft", max_seq_len=256))
    return items, counts


def test_the_choice_is_seeded_nested_and_the_same_for_max_rows_and_fraction():
    records = list(range(1000))
    picked = list(subsample(iter(records), "ultrachat", Subsample(max_rows=100, seed=42)))
    assert len(picked) == 100 and picked == sorted(picked)  # read order kept
    assert picked == list(subsample(iter(records), "ultrachat", Subsample(max_rows=100, seed=42)))
    assert set(picked) <= set(subsample(iter(records), "ultrachat", Subsample(max_rows=300, seed=42)))
    assert picked == list(subsample(iter(records), "ultrachat", Subsample(fraction=0.1, seed=42)))
    assert picked != list(subsample(iter(records), "ultrachat", Subsample(max_rows=100, seed=43)))
    assert picked != list(subsample(iter(records), "openorca", Subsample(max_rows=100, seed=42)))
    # A source with fewer records than max_rows gives all of them.
    assert list(subsample(iter(range(7)), "x", Subsample(max_rows=100))) == list(range(7))


@pytest.mark.parametrize("fraction, available, kept", [(0.1, 30, 3), (0.05, 30, 2), (0.01, 30, 1), (1.0, 30, 30),
                                                       (0.5, 0, 0)])
def test_fraction_rounds_half_up_and_keeps_at_least_one(fraction, available, kept):
    assert Subsample(fraction=fraction).count(available) == kept


def test_a_source_s_subsample_is_stable_and_independent_of_the_other_sources(tmp_path, sp_model, caplog):
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", sft_records("messages", n)) for name, n in
             (("a", 30), ("b", 24))}
    tok = Tokenizer(sp_model)
    with caplog.at_level(logging.INFO, logger="danube.data.finetune"):
        items, counts = load(files, sp_model, max_rows=10)
    assert len(items) == 20 and counts["used"] == 20 and counts["samples"] == 20
    assert {k: (v["kept"], v["used"], v["items"]) for k, v in counts["sources"].items()} == {
        "a": (30, 10, 10), "b": (24, 10, 10)}
    table = caplog.text.split("chat data read", 1)[1]
    assert "used" in table and "30" in table.split("\n  a ", 1)[1].split("\n")[0]
    # The same rows on a second load, and with the sources the other way round.
    again, _ = load(files, sp_model, max_rows=10)
    assert answers(again, tok) == answers(items, tok)
    swapped, _ = load(dict(reversed(files.items())), sp_model, max_rows=10)
    assert answers(swapped[10:] + swapped[:10], tok) == answers(items, tok)
    # Only a source's own seed changes its choice; fraction 0.25 of 30 is 8 (7.5 rounded half up).
    assert answers(load(files, sp_model, seed=7, max_rows=10)[0], tok) != answers(items, tok)
    _, counts = load(files, sp_model, fraction=0.25)
    assert {k: v["used"] for k, v in counts["sources"].items()} == {"a": 8, "b": 6}


KEY = "chat_data.sources.messages"


@pytest.mark.parametrize("overrides, message", [
    ([f"{KEY}.max_rows=0"], rf"{KEY}.max_rows=0 must be >= 1"),
    ([f"{KEY}.fraction=0"], rf"{KEY}.fraction=0 must be > 0"),
    ([f"{KEY}.fraction=1.5"], rf"{KEY}.fraction=1.5 must be <= 1"),
    ([f"{KEY}.max_rows=5", f"{KEY}.fraction=0.5"], rf"{KEY}: max_rows=5 and fraction=0.5 both given; set one"),
])
def test_bad_subsample_values_fail_in_one_line_before_any_work(tiny_model_dir, chat_files, tmp_path, overrides,
                                                                message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        run(compose_finetune(CPU + [f"model_dir={tiny_model_dir}", "chat_data=messages", f"run_dir={tmp_path / 'x'}",
                                    f"{KEY}.path={chat_files['messages']}", *overrides]))
    assert not (tmp_path / "x").exists()


def test_report_mixes_say_which_counts_the_report_gives():
    """The report gives only totals (157k SFT samples, ~5k Oasst2 pairs): no source is cut by default."""
    for experiment in ("danube_chat_sft", "danube_chat_dpo1", "danube_chat_dpo2"):
        cfg = compose_finetune([f"experiment={experiment}", "model_dir=/base"])
        for name, source in cfg.chat_data.sources.items():
            assert source.max_rows is None and source.fraction is None, (experiment, name)
