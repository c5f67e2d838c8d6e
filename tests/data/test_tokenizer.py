import json

import pytest
import torch
from transformers import AutoTokenizer

from danube.cli import main
from danube.data.tokenizer import Tokenizer, save_hf_tokenizer
from danube.hf import to_hf
from danube.model import DanubeConfig, build_model

TRICKY = [
    "Hello world",
    " leading space",
    "  two leading and  double  spaces",
    "line one\nline two\n\n  indented\tand tab",
    "digits 1234567890 and 3.14159",
    "unicode: héllo ü 日本語 🎉",
    "trailing  ",
]


def test_special_ids_and_round_trip(sp_model):
    tok = Tokenizer(sp_model)
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 1000)
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("abc", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    # digits are split one piece each (as Llama 2 / Mistral)
    assert len(tok.encode("1234567890")) == 10


def test_hugging_face_files_give_sentencepiece_ids(sp_model, tmp_path):
    tok = Tokenizer(sp_model)
    save_hf_tokenizer(sp_model, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TRICKY:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), repr(text)
    assert hf("Hello")["input_ids"] == tok.encode("Hello", bos=True)
    assert hf.eos_token_id == tok.eos_id


def test_to_hf_with_tokenizer(sp_model, tmp_path):
    cfg = DanubeConfig(vocab_size=1000, n_embd=32, intermediate_size=64, n_layer=1, n_head=2, n_kv_head=1)
    to_hf(build_model(cfg), tmp_path / "hf", tokenizer=sp_model)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf(TRICKY[2], add_special_tokens=False)["input_ids"] == Tokenizer(sp_model).encode(TRICKY[2])


def test_missing_or_bad_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        Tokenizer(tmp_path / "nothing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(tmp_path / "bad.model")


def test_train_tokenizer_cli_on_jsonl(tmp_path, capsys):
    from tests.conftest import corpus_lines

    with open(tmp_path / "docs.jsonl", "w") as f:
        for line in corpus_lines(100):
            f.write(json.dumps({"body": line}) + "\n")
    out = tmp_path / "t.model"
    assert main(["train-tokenizer", str(tmp_path / "docs.jsonl"), "-o", str(out), "--vocab-size", "500",
                 "--text-field", "body"]) == 0
    assert Tokenizer(out).vocab_size == 500
    (tmp_path / "broken.jsonl").write_text('{"body": "ok"}\n{"nobody": 1}\n')
    before = out.read_bytes()
    assert main(["train-tokenizer", str(tmp_path / "broken.jsonl"), "-o", str(out), "--text-field", "body"]) == 1
    assert "broken.jsonl:2" in capsys.readouterr().err
    assert out.read_bytes() == before  # the earlier tokenizer is untouched


def test_train_tokenizer_dummy_prefix_makes_a_llama2_style_model(tmp_path):
    from tests.conftest import corpus_lines

    (tmp_path / "docs.txt").write_text("\n".join(corpus_lines(100)))
    for flag, expected in (([], False), (["--dummy-prefix"], True)):
        out = tmp_path / f"t{expected}.model"
        assert main(["train-tokenizer", str(tmp_path / "docs.txt"), "-o", str(out), "--vocab-size", "400", *flag]) == 0
        tok = Tokenizer(out)
        assert tok.add_dummy_prefix is expected
        assert tok.id_to_piece(tok.encode("the")[0]).startswith("▁") is expected


def test_export_refuses_a_tokenizer_whose_ids_it_cannot_reproduce(tmp_path):
    import sentencepiece as spm

    from tests.conftest import corpus_lines

    # SentencePiece's defaults: a unigram model with NFKC normalisation and squeezed whitespace.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines(100)), model_prefix=str(tmp_path / "uni"),
                                   vocab_size=300, minloglevel=2)
    with pytest.raises(ValueError) as err:
        save_hf_tokenizer(tmp_path / "uni.model", tmp_path / "hf")
    message = str(err.value)
    assert "uni.model" in message and "UNIGRAM" in message and "nmt_nfkc" in message and "remove_extra_whitespaces" in message
    assert not (tmp_path / "hf").exists()  # refused before anything is written
