import json

import numpy as np
import pytest
import torch

from danube.data.quality import classifier
from danube.data.quality.classifier import metrics
from danube.data.quality.filter import load_scorer
from danube.data.quality.gbm import GBMScorer, train_gbm
from danube.data.quality.transformer import (
    HFScorer, TransformerScorer, classifier_config, train_transformer,
)
from tests.data.quality_texts import clean_docs, junk_docs

ALL_JUNK = ("chars", "symbols", "boilerplate", "repetition", "salad")
# A mean-pooled bag of tokens cannot tell a repeated prose line or shuffled prose from
# prose; the transformer test sticks to junk that reads differently token by token.
TOKEN_JUNK = ("chars", "symbols", "boilerplate")


def _sets(n_train: int, n_test: int, kinds: tuple[str, ...]):
    """Train and held-out sets: different prose documents, junk from different seeds."""
    train = clean_docs(n_train) + junk_docs(n_train, seed=1, kinds=kinds)
    test = clean_docs(n_test, offset=n_train) + junk_docs(n_test, seed=2, kinds=kinds)
    y_train = np.array([1] * n_train + [0] * n_train)
    y_test = np.array([1] * n_test + [0] * n_test)
    return train, y_train, test, y_test


@pytest.fixture(scope="module")
def gbm():
    train, y_train, test, y_test = _sets(120, 80, ALL_JUNK)
    scorer, report = train_gbm(train, y_train, val_fraction=0.2, seed=0)
    return scorer, report, test, y_test


@pytest.fixture(scope="module")
def transformer(sp_model):
    train, y_train, test, y_test = _sets(120, 60, TOKEN_JUNK)
    cfg = classifier_config(1000, max_tokens=64, n_layer=2, n_embd=64)
    # One thread: on a shared 2-core machine, two threads of tiny matmuls mostly wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scorer, report = train_transformer(train, y_train, sp_model, cfg, max_tokens=64, steps=120, batch_size=16,
                                           val_fraction=0.1, seed=0)
    finally:
        torch.set_num_threads(threads)
    return scorer, report, test, y_test


def test_gbm_separates_held_out_prose_from_junk(gbm):
    scorer, report, test, y_test = gbm
    m = metrics(y_test, scorer.score(test))
    assert m["auc"] >= 0.95 and m["accuracy"] >= 0.9, m
    assert report["val"]["examples"] == 48 and report["val"]["accuracy"] >= 0.9, report


def test_gbm_save_load_gives_identical_scores(gbm, tmp_path):
    scorer, report, test, _ = gbm
    scorer.save(tmp_path / "gbm", {"trained": report})
    back = load_scorer(tmp_path / "gbm", "gbm")
    assert isinstance(back, GBMScorer)
    np.testing.assert_array_equal(back.score(test), scorer.score(test))
    meta = json.loads((tmp_path / "gbm" / classifier.META_FILE).read_text())
    assert meta["kind"] == "gbm" and meta["trained"]["positive"] == 120 and len(meta["feature_names"]) > 20


def test_gbm_with_other_features_is_refused(gbm, tmp_path):
    scorer, *_ = gbm
    scorer.save(tmp_path / "gbm")
    meta_file = tmp_path / "gbm" / classifier.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["feature_names"] = meta["feature_names"][:-1] + ["words_in_caps"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"trained on feature version 1 .*differ: \['max_word_len', 'words_in_caps'\]"):
        load_scorer(tmp_path / "gbm", "gbm")


def test_transformer_classifier_learns_on_cpu(transformer):
    scorer, report, test, y_test = transformer
    m = metrics(y_test, scorer.score(test))
    assert m["accuracy"] >= 0.85 and m["auc"] >= 0.9, m
    assert report["final_loss"] < 0.45, report


def test_transformer_save_load_gives_identical_scores(transformer, tmp_path):
    scorer, report, test, _ = transformer
    scorer.save(tmp_path / "tf", {"trained": report})
    assert sorted(p.name for p in (tmp_path / "tf").iterdir()) == [
        "config.yaml", "model.safetensors", "quality_classifier.json", "tokenizer.model"]
    back = load_scorer(tmp_path / "tf", "transformer")
    assert isinstance(back, TransformerScorer) and back.max_tokens == 64
    np.testing.assert_array_equal(back.score(test), scorer.score(test))
    # Right padding never reaches a causal model's earlier tokens: a document scores the
    # same alone as in a padded batch.
    alone = np.array([back.score([t])[0] for t in test[:6]])
    np.testing.assert_allclose(alone, scorer.score(test[:6]), atol=1e-5)


def test_classifier_of_the_wrong_kind_is_a_clear_error(gbm, transformer, tmp_path):
    gbm[0].save(tmp_path / "gbm")
    transformer[0].save(tmp_path / "tf")
    with pytest.raises(ValueError, match=r"is a gbm quality classifier, not a transformer one \(pass it with --gbm\)"):
        load_scorer(tmp_path / "gbm", "transformer")
    with pytest.raises(ValueError, match="is a transformer quality classifier, not a gbm one"):
        load_scorer(tmp_path / "tf", "gbm")
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="is not a danube quality classifier: no quality_classifier.json"):
        load_scorer(tmp_path / "other", "gbm")
    with pytest.raises(FileNotFoundError, match="quality classifier not found"):
        load_scorer(tmp_path / "missing", "gbm")
    (tmp_path / "gbm" / "gbm.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="gbm.pkl: not a readable pickled classifier"):
        load_scorer(tmp_path / "gbm", "gbm")


def test_transformer_with_another_tokenizer_is_refused(transformer, tmp_path):
    from danube.data.tokenizer import train_tokenizer

    transformer[0].save(tmp_path / "tf")
    (tmp_path / "c.txt").write_text("\n".join(clean_docs(30)))
    train_tokenizer([tmp_path / "c.txt"], tmp_path / "tf" / "tokenizer.model", vocab_size=400)
    with pytest.raises(ValueError, match="not the tokenizer the classifier was trained with"):
        load_scorer(tmp_path / "tf", "transformer")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random two-label BERT with a word-piece vocabulary written here (nothing downloaded)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = tmp_path_factory.mktemp("bert")
    words = sorted({w.strip(".,;:()\"'").lower() for d in clean_docs(40) for w in d.split()} - {""})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words[:500]]) + "\n")
    tok = BertTokenizer(str(root / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    out = root / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model, tok


def test_local_hugging_face_classifier_scores(tiny_bert):
    path, model, tok = tiny_bert
    scorer = load_scorer(path, "transformer", batch_size=4, hf_max_tokens=64)
    assert isinstance(scorer, HFScorer)
    texts = clean_docs(3) + junk_docs(3, seed=0)
    scores = scorer.score(texts)
    with torch.no_grad():
        batch = tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
        expected = torch.softmax(model(**batch).logits, -1)[:, 1].numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert ((scores > 0) & (scores < 1)).all()
    with pytest.raises(ValueError, match="label 2 is not one of its 2 labels"):
        load_scorer(path, "transformer", hf_label=2)


def test_filter_takes_a_hugging_face_directory_as_the_transformer(tiny_bert, tmp_path):
    from danube.data.quality import filter_documents

    path, *_ = tiny_bert
    docs = clean_docs(6)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    report = filter_documents([src], tmp_path / "out.jsonl", rules=None, transformer=path, transformer_threshold=0.0)
    assert report["layers"][0]["layer"] == "transformer" and report["layers"][0]["model"] == str(path)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = load_scorer(path, "transformer").score(docs)
    assert [r["quality"]["transformer"] for r in records] == pytest.approx(expected.tolist(), abs=1e-6)
