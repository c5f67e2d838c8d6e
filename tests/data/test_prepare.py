import gzip
import json

import numpy as np
import pytest

from danube.cli import main
from danube.corpus.prepare import prepare
from danube.data.prepare import check_tokenizer, read_manifest
from danube.data.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import corpus_lines
from tests.data.conftest import make_docs, read_stream, split_docs, write_jsonl


def _write(fmt, path, docs):
    if fmt == "txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif fmt == "jsonl":
        write_jsonl(path, docs)
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Several row groups: each is a separate unit of work.
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path, row_group_size=7)
    return path


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.gz", "parquet"])
def test_each_format_round_trips_as_bos_doc_eos(fmt, tmp_path, sp_model):
    docs = make_docs(40)
    src = _write(fmt, tmp_path / f"in.{fmt}", docs)
    m = prepare([src], tmp_path / "out", sp_model, val_fraction=0.0, num_workers=1)
    tok = Tokenizer(sp_model)
    stream = read_stream(tmp_path / "out" / "train")
    got = [tok.decode(ids) for ids in split_docs(stream, tok.bos_id, tok.eos_id)]
    assert got == docs
    assert m["totals"]["train"]["tokens"] == len(stream)
    assert m["totals"]["train"]["documents"] == len(docs)
    assert m["sources"][0]["train"]["tokens"] == len(stream)


def test_directory_inputs_recurse_and_counts_match_readable_tokens(tmp_path, sp_model):
    _write("jsonl", tmp_path / "in" / "a.jsonl", make_docs(30))
    (tmp_path / "in" / "sub").mkdir()
    _write("txt", tmp_path / "in" / "sub" / "b.txt", make_docs(20, offset=100))
    (tmp_path / "in" / "notes.md").write_text("ignored")
    m = prepare([tmp_path / "in"], tmp_path / "out", sp_model, val_fraction=0.2, num_workers=2, chunk_bytes="2KB")
    assert [s["path"].split("/")[-1] for s in m["sources"]] == ["a.jsonl", "b.txt"]
    for split in ("train", "val"):
        assert m["totals"][split]["chunks"] >= 1
        assert len(read_stream(tmp_path / "out" / split)) == m["totals"][split]["tokens"]
        assert sum(s[split]["tokens"] for s in m["sources"]) == m["totals"][split]["tokens"]
    assert m["totals"]["train"]["chunks"] > 1  # 2KB chunks: the stream spans several shards
    on_disk = read_manifest(tmp_path / "out")
    assert on_disk == m
    assert on_disk["tokenizer"]["checksum"] == Tokenizer(sp_model).checksum
    assert on_disk["tokenizer"]["vocab_size"] == 1000


def test_val_split_is_deterministic_and_disjoint(tmp_path, sp_model):
    docs = make_docs(300)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    tok = Tokenizer(sp_model)

    def run(name, workers, seed=0):
        prepare([src], tmp_path / name, sp_model, val_fraction=0.3, num_workers=workers, seed=seed)
        return {s: [tok.decode(d) for d in split_docs(read_stream(tmp_path / name / s), 1, 2)] for s in ("train", "val")}

    one, two, other_seed = run("w1", 1), run("w2", 2), run("s1", 1, seed=1)
    assert one == two  # independent of the number of workers
    assert not set(one["train"]) & set(one["val"])
    assert sorted(one["train"] + one["val"]) == sorted(docs)
    assert 0.2 < len(one["val"]) / len(docs) < 0.4
    assert set(other_seed["val"]) != set(one["val"])
    for split in ("train", "val"):  # the shard bytes too, not only the decoded text
        chunks = sorted((tmp_path / "w1" / split).glob("*.bin"))
        assert [c.read_bytes() for c in chunks] == [(tmp_path / "w2" / split / c.name).read_bytes() for c in chunks]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ('{"txt": "x"}', "no 'text' field"),
        ('{"text": 5}', "'text' is int, not a string"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line_before_writing(bad, message, tmp_path, sp_model):
    lines = [json.dumps({"text": d}) for d in make_docs(10)]
    lines.insert(6, bad)
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:7: {message}"):
        prepare([src], tmp_path / "out", sp_model, num_workers=1)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary directory left behind


def test_line_number_is_right_deep_into_a_split_file(tmp_path, sp_model):
    line = json.dumps({"text": "x" * 200})
    lines = [line] * 3000
    lines[2899] = '{"text": null}'
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(lines) + "\n")  # ~640 KB: several units of work
    with pytest.raises(ValueError, match=r"big\.jsonl:2900: 'text' is NoneType"):
        prepare([src], tmp_path / "out", sp_model, num_workers=4)


def test_failure_keeps_the_existing_dataset(tmp_path, sp_model):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(20))
    prepare([good], tmp_path / "out", sp_model, num_workers=1)
    before = read_manifest(tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        prepare([good, bad], tmp_path / "out", sp_model, num_workers=1, overwrite=True)
    assert read_manifest(tmp_path / "out") == before
    assert len(read_stream(tmp_path / "out" / "train")) == before["totals"]["train"]["tokens"]


def test_skip_bad_counts_bad_and_empty_records(tmp_path, sp_model, caplog):
    docs = make_docs(12)
    lines = [json.dumps({"text": d}) for d in docs]
    lines[2:2] = ["{broken", '{"text": 3}', '{"other": "x"}', '{"text": ""}', '{"text": "  \\n "}']
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="danube.data.prepare"):
        m = prepare([src], tmp_path / "out", sp_model, num_workers=1, skip_bad=True, val_fraction=0.0)
    s = m["sources"][0]
    assert (s["bad_lines"], s["empty_documents"], s["train"]["documents"]) == (3, 2, 12)
    assert m["totals"]["bad_lines"] == 3 and m["totals"]["empty_documents"] == 2
    assert "mixed.jsonl:3: not valid JSON" in caplog.text and "mixed.jsonl:5: no 'text' field" in caplog.text
    tok = Tokenizer(sp_model)
    assert [tok.decode(d) for d in split_docs(read_stream(tmp_path / "out" / "train"), 1, 2)] == docs


def test_parquet_errors_name_file_and_row(tmp_path, sp_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match=r"nocol\.parquet: no column 'text' \(columns: body\)"):
        prepare([tmp_path / "nocol.parquet"], tmp_path / "out", sp_model, num_workers=1)
    pq.write_table(pa.table({"text": ["a b c", None, "d"]}), tmp_path / "null.parquet")
    with pytest.raises(ValueError, match=r"null\.parquet: row 1: 'text' is null"):
        prepare([tmp_path / "null.parquet"], tmp_path / "out", sp_model, num_workers=1)
    m = prepare([tmp_path / "null.parquet"], tmp_path / "out", sp_model, num_workers=1, skip_bad=True, val_fraction=0)
    assert m["totals"]["bad_lines"] == 1 and m["totals"]["train"]["documents"] == 2


def test_refuses_to_overwrite_unless_asked(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(20))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare([src], tmp_path / "out", sp_model, num_workers=1)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    prepare([src], tmp_path / "out", sp_model, num_workers=1, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert read_manifest(tmp_path / "out")["totals"]["documents"] == 20
    (tmp_path / "empty").mkdir()  # an empty directory is fine without --overwrite
    prepare([src], tmp_path / "empty", sp_model, num_workers=1)


def test_other_tokenizer_is_refused_with_both_checksums(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(20))
    prepare([src], tmp_path / "out", sp_model, num_workers=1)
    (tmp_path / "corpus.txt").write_text("\n".join(corpus_lines(100)))
    other = Tokenizer(train_tokenizer([tmp_path / "corpus.txt"], tmp_path / "other.model", vocab_size=500))
    mine = Tokenizer(sp_model)
    check_tokenizer(tmp_path / "out", mine.checksum)
    with pytest.raises(ValueError) as err:
        check_tokenizer(tmp_path / "out", other.checksum)
    assert mine.checksum in str(err.value) and other.checksum in str(err.value) and str(sp_model) in str(err.value)


def test_uint16_tokens_for_small_vocab(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(5))
    m = prepare([src], tmp_path / "out", sp_model, num_workers=1, val_fraction=0)
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert m["dtype"] == "uint16" and index["config"]["data_format"] == [f"no_header_numpy:{_np_index('uint16')}"]


def _np_index(name):
    from litdata.constants import _NUMPY_DTYPES_MAPPING

    return next(k for k, v in _NUMPY_DTYPES_MAPPING.items() if np.dtype(v) == np.dtype(name))


def test_cli_prints_tokens_per_split_and_errors_cleanly(tmp_path, sp_model, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(50))
    argv = ["prepare", str(src), "-o", str(tmp_path / "out"), "--tokenizer", str(sp_model), "--val-fraction", "0.2",
            "--workers", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    m = read_manifest(tmp_path / "out")
    assert f"train: {m['totals']['train']['tokens']:,} tokens" in out
    assert f"val:   {m['totals']['val']['tokens']:,} tokens" in out
    assert main(argv) == 1  # exists now
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
