import json
import time

import pytest
import torch

from danube.data.prepare import read_manifest
from danube.data.pretrain import PretrainDataModule
from danube.data.sample import SOURCES, ensure_sample_data, ensure_sample_sources, labelled_documents, sample_documents
from danube.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return root, *ensure_sample_data(root)


def test_sample_data_is_a_million_tokens_of_real_text(sample):
    root, tok_path, shards = sample
    tok = Tokenizer(tok_path)
    m = read_manifest(shards)
    assert tok.vocab_size == 4096 and m["tokenizer"]["checksum"] == tok.checksum
    assert m["totals"]["train"]["tokens"] >= 1_000_000
    assert m["totals"]["val"]["tokens"] >= 10_000  # enough for a val loss at seq_len 2048
    dm = PretrainDataModule(str(shards), seq_len=128, micro_batch_size=2, num_workers=0,
                            tokenizer_checksum=tok.checksum)
    batch = next(iter(dm.train_dataloader()))
    text = tok.decode(batch["tokens"][0].tolist())
    assert len(text.split()) > 10  # words, not byte soup


def test_second_call_reuses_what_exists(sample):
    root, tok_path, shards = sample
    stamp = (shards / "train" / "index.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_sample_data(root) == (tok_path, shards)
    assert time.perf_counter() - t0 < 1.0
    assert (shards / "train" / "index.json").stat().st_mtime_ns == stamp


def test_sample_corpus_is_deterministic():
    assert sample_documents() == sample_documents()


def test_rebuilds_the_shards_when_they_no_longer_match_the_tokenizer(tmp_path):
    tok_path, shards = ensure_sample_data(tmp_path, vocab_size=1024)
    stamp = (shards / "train" / "index.json").stat().st_mtime_ns
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["tokenizer"]["checksum"] = "0" * 64  # the shards were made with some other tokenizer
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert ensure_sample_data(tmp_path, vocab_size=1024) == (tok_path, shards)
    tok = Tokenizer(tok_path)
    assert tok.vocab_size == 1024 and read_manifest(shards)["tokenizer"]["checksum"] == tok.checksum
    assert (shards / "train" / "index.json").stat().st_mtime_ns != stamp


def test_another_vocabulary_size_never_replaces_the_sample_tokenizer(tmp_path):
    """Runs trained on the sample refer to its tokenizer: data.vocab_size=N must not rebuild it in place."""
    tok_path, shards = ensure_sample_data(tmp_path, vocab_size=1024)
    before = tok_path.read_bytes()
    with pytest.raises(ValueError, match=r"1,024-piece tokenizer, not 2,048 .*data.root=.*_2048"):
        ensure_sample_data(tmp_path, vocab_size=2048)
    assert tok_path.read_bytes() == before and read_manifest(shards)["tokenizer"]["vocab_size"] == 1024


def test_sample_sources_split_the_corpus_by_kind_of_text(sample):
    root, tok_path, shards = sample
    tok, dirs = ensure_sample_sources(root)
    assert tok == tok_path and list(dirs) == list(SOURCES) == ["topics", "docstrings", "code"]
    labelled = labelled_documents()
    assert [text for _, text in labelled] == sample_documents()  # the same corpus, each document in one source
    manifests = {name: read_manifest(d) for name, d in dirs.items()}
    for name, m in manifests.items():
        assert m["tokenizer"]["checksum"] == Tokenizer(tok_path).checksum
        assert m["totals"]["documents"] == sum(source == name for source, _ in labelled)
    assert sum(m["totals"]["tokens"] for m in manifests.values()) == read_manifest(shards)["totals"]["tokens"]
    code = (dirs["code"].parent / "code.jsonl").read_text()
    assert "def " in code and "import " in code
    stamp = (dirs["code"] / "train" / "index.json").stat().st_mtime_ns
    assert ensure_sample_sources(root)[1] == dirs  # reused, not rebuilt
    assert (dirs["code"] / "train" / "index.json").stat().st_mtime_ns == stamp
