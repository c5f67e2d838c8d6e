"""Every conversation and preference shape reads to the same messages; bad records name file:line."""

import json

import pytest

from danube.data.oasst2 import preference_pairs, read_messages
from danube.data.preference import read_pairs
from danube.data.records import RecordError
from danube.data.sft import read_conversations
from tests.chat.conftest import qa, write_jsonl


@pytest.mark.parametrize("fmt", ["messages", "ultrachat", "sharegpt", "openorca", "metamath"])
def test_sft_shapes_read_to_messages(chat_files, fmt):
    convs = read_conversations(chat_files[fmt], fmt)
    assert len(convs) == 30
    for i, msgs in enumerate(convs):
        q, a = qa(i)
        turns = [m for m in msgs if m["role"] != "system"]
        assert turns[:2] == [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    systems = sum(msgs[0]["role"] == "system" for msgs in convs)
    assert systems == (15 if fmt in ("sharegpt", "openorca") else 0)  # empty system prompts are left out


def test_oasst2_trees_give_their_best_ranked_path(chat_files):
    convs = read_conversations(chat_files["oasst2"], "oasst2")
    assert len(convs) == 30
    assert all(c[0]["role"] == "user" and len(c) == 2 for c in convs)
    assert sorted(c[1]["content"] for c in convs) == sorted(qa(i)[1] for i in range(30))


@pytest.mark.parametrize("fmt", ["ultrafeedback", "orca_dpo", "distilabel_math", "pairs"])
def test_preference_shapes_read_to_pairs(chat_files, fmt):
    pairs = read_pairs(chat_files[fmt], fmt)
    assert len(pairs) == 30
    for i, p in enumerate(pairs):
        q, a = qa(i)
        assert p.prompt[-1] == {"role": "user", "content": q}
        assert (p.chosen, p.rejected) == (a, "No idea, sorry.")


@pytest.mark.parametrize("fmt, bad, match", [
    ("openorca", {"question": "q"}, "missing \\['response'\\]"),
    ("metamath", {"query": "q", "response": 3}, "'response' must be a string"),
    ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}]}, "'from' in"),
    ("messages", {"messages": [{"role": "assistant", "content": "x"}]}, "expected a user message"),
    ("orca_dpo", {"question": "q", "chosen": "c"}, "missing \\['rejected'\\]"),
    ("ultrafeedback", {"chosen": "c", "rejected": "r"}, "'chosen' must be a message list"),
])
def test_a_malformed_record_names_its_file_and_line(tmp_path, fmt, bad, match):
    from tests.chat.conftest import pref_records, sft_records

    good = sft_records(fmt, 5) if fmt in ("openorca", "metamath", "sharegpt", "messages") else pref_records(fmt, 5)
    path = write_jsonl(tmp_path / "data.jsonl", good[:3] + [bad] + good[3:])
    reader = read_pairs if fmt in ("orca_dpo", "ultrafeedback") else read_conversations
    with pytest.raises(RecordError, match=f"^{path}:4: .*{match}"):
        reader(path, fmt)


def test_invalid_json_names_its_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"query": "q", "response": "r"}) + "\n\n{not json\n")
    with pytest.raises(RecordError, match=f"^{path}:3: not valid JSON"):
        read_conversations(path, "metamath")


def row(mid, parent, role, text, rank=None, lang="en", deleted=False):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": lang,
            "deleted": deleted, "message_tree_id": "x"}


def handmade_tree():
    return [
        # tree 1 (English): root -> 3 ranked replies (one deleted); the best reply has a follow-up
        row("r1", None, "prompter", "Q1"),
        row("a1", "r1", "assistant", "best", rank=0),
        row("a2", "r1", "assistant", "middle", rank=1),
        row("a3", "r1", "assistant", "worst", rank=2),
        row("a4", "r1", "assistant", "gone", rank=3, deleted=True),
        row("p1", "a1", "prompter", "Follow-up?"),
        row("b1", "p1", "assistant", "yes", rank=0),
        row("b2", "p1", "assistant", "no", rank=1),
        row("b3", "p1", "assistant", "unranked", rank=None),
        # a single reply: no pair
        row("p2", "a2", "prompter", "Other follow-up?"),
        row("c1", "p2", "assistant", "alone", rank=0),
        # tree 2 (German): no English pair
        row("r2", None, "prompter", "Frage", lang="de"),
        row("d1", "r2", "assistant", "gut", rank=0, lang="de"),
        row("d2", "r2", "assistant", "schlecht", rank=1, lang="de"),
        # tree 3: two replies, one unranked
        row("r3", None, "prompter", "Q3"),
        row("e1", "r3", "assistant", "ranked", rank=0),
        row("e2", "r3", "assistant", "not ranked", rank=None),
    ]


def test_oasst2_pairs_count_kept_and_skipped_groups(tmp_path):
    path = write_jsonl(tmp_path / "oasst2.jsonl", handmade_tree())
    pairs, stats = preference_pairs(read_messages(path), lang="en")
    assert stats.trees == 3 and stats.groups == 5 and stats.kept == 2
    assert stats.skipped == {"fewer than two ranked replies": 3}
    assert stats.dropped_replies == {"deleted": 1, "other language": 2, "unranked": 2}
    by_parent = {p["parent_id"]: p for p in pairs}
    assert (by_parent["r1"]["chosen"], by_parent["r1"]["rejected"]) == ("best", "worst")
    assert by_parent["r1"]["prompt"] == [{"role": "user", "content": "Q1"}]
    assert (by_parent["p1"]["chosen"], by_parent["p1"]["rejected"]) == ("yes", "no")
    assert by_parent["p1"]["prompt"] == [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "best"},
        {"role": "user", "content": "Follow-up?"}]
    german, _ = preference_pairs(read_messages(path), lang="de")
    assert [(p["chosen"], p["rejected"]) for p in german] == [("gut", "schlecht")]


def test_oasst2_pairs_command_writes_pairs_that_the_dpo_reader_reads(tmp_path, capsys):
    from danube.cli import main

    src = write_jsonl(tmp_path / "oasst2.jsonl", handmade_tree())
    out = tmp_path / "pairs.jsonl"
    assert main(["oasst2-pairs", str(src), str(out), "--lang", "en"]) == 0
    printed = capsys.readouterr().out
    assert "trees: 3 seen" in printed and "5 seen, 2 kept, 3 skipped" in printed
    assert "1 deleted, 2 other language, 2 unranked" in printed and "pairs written: 2" in printed
    pairs = read_pairs(out, "pairs")
    assert sorted(p.prompt[-1]["content"] for p in pairs) == ["Follow-up?", "Q1"]


# -- bad input named where it is (issue 11) -------------------------------------------------------
def test_an_oasst2_parent_cycle_is_refused_at_read_time_naming_the_file_and_the_loop(tmp_path):
    rows = handmade_tree() + [row("x1", "x3", "prompter", "loop"), row("x2", "x1", "assistant", "a", rank=0),
                              row("x3", "x2", "prompter", "b"), row("x4", "x3", "assistant", "c", rank=0),
                              row("x5", "x3", "assistant", "d", rank=1)]
    path = write_jsonl(tmp_path / "oasst2.jsonl", rows)
    with pytest.raises(RecordError, match=rf"^{path}: Oasst2 parent links form a loop: x1 -> x3 -> x2 -> x1 "
                                          rf"\(first row: {path}:18\)"):
        read_messages(path)
    from danube.cli import main

    # `danube oasst2-pairs` used to walk the loop forever; now it stops with the error.
    assert main(["oasst2-pairs", str(path), str(tmp_path / "pairs.jsonl")]) == 1
    assert not (tmp_path / "pairs.jsonl").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_non_utf8_file_names_the_file_and_the_line(tmp_path, suffix):
    good = [json.dumps({"query": f"q{i}", "response": "r"}).encode() for i in range(4)]
    bad = b'{"query": "caf\xe9", "response": "r"}'  # Latin-1
    if suffix == ".jsonl":
        data = b"\n".join(good[:2] + [bad] + good[2:]) + b"\n"
    else:
        data = b"[\n" + b",\n".join(good[:2] + [bad] + good[2:]) + b"\n]\n"
    path = tmp_path / f"metamath{suffix}"
    path.write_bytes(data)
    with pytest.raises(RecordError, match=rf"^{path}:{3 if suffix == '.jsonl' else 4}: not UTF-8 text \(byte 0xe9"):
        read_conversations(path, "metamath")


def test_an_ultrafeedback_message_given_as_a_string_names_file_row_and_field(tmp_path):
    from tests.chat.conftest import pref_records

    records = pref_records("ultrafeedback", 4)
    records[2]["chosen"] = ["What is it?", "It is 2."]  # strings, not {role, content} objects
    path = write_jsonl(tmp_path / "uf.jsonl", records)
    with pytest.raises(RecordError, match=rf"^{path}:3: chosen\[0\] must be a \{{role, content\}} object, got str "
                                          r"'What is it\?'"):
        read_pairs(path, "ultrafeedback")
    records[2] = pref_records("ultrafeedback", 4)[2]
    records[1]["rejected"] = [{"role": "user", "content": "q"}, "No idea."]
    with pytest.raises(RecordError, match=rf"^{write_jsonl(path, records)}:2: rejected\[1\] must be a \{{role, "):
        read_pairs(path, "ultrafeedback")


def test_an_oasst2_conversation_error_names_the_file_and_the_tree(tmp_path):
    rows = handmade_tree() + [row("r9", None, "prompter", "Q9"), row("p9", "r9", "prompter", "again?"),
                              row("a9", "p9", "assistant", "yes", rank=0)]
    rows[-3]["message_tree_id"] = "tree-9"
    path = write_jsonl(tmp_path / "oasst2.jsonl", rows)
    with pytest.raises(RecordError, match=rf"^{path}:18: Oasst2 tree tree-9: message 1: expected a assistant message"
                                          r".* \(along messages r9 -> p9 -> a9\)"):
        read_conversations(path, "oasst2")


def test_a_json_array_file_reads_element_by_element(tmp_path):
    records = [{"query": f"q{i}", "response": f"r{i}"} for i in range(50)]
    path = tmp_path / "MetaMathQA-395K.json"
    path.write_text(json.dumps(records, indent=4))
    from danube.data.records import read_json_array

    assert [r for _, _, r in read_json_array(path, chunk_bytes=64)] == records  # elements cut across chunks
    assert [line for _, line, _ in read_json_array(path)][:2] == [2, 6]
    assert len(read_conversations(path, "metamath")) == 50
    path.write_text(json.dumps(records)[:-40])
    with pytest.raises(RecordError, match=rf"^{path}:1: element 4\d: not valid JSON|the JSON array is not closed"):
        read_conversations(path, "metamath")
