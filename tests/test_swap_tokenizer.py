"""`danube swap-tokenizer`: shared pieces keep their rows bit for bit, new pieces are freshly initialised."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from danube.cli import main
from danube.data.tokenizer import Tokenizer, train_tokenizer
from danube.model import DanubeConfig, build_model
from danube.model.io import read_config, save_model_dir
from danube.model.loading import load_model
from danube.swap_tokenizer import swap_tokenizer

STD = 0.02


@pytest.fixture(scope="module")
def code_tokenizer(tmp_path_factory):
    """An 800-piece tokenizer trained on Python source: overlaps the pydoc-prose one (sp_model), unlike it elsewhere."""
    import argparse
    import json
    import pathlib

    root = tmp_path_factory.mktemp("tok_code")
    text = "\n".join(inspect.getsource(m) for m in (argparse, json.decoder, json.encoder, pathlib, textwrap))
    (root / "code.txt").write_text(text)
    return train_tokenizer([root / "code.txt"], root / "code.model", vocab_size=800)


@pytest.fixture
def old_model_dir(tmp_path, sp_model):
    cfg = DanubeConfig(vocab_size=1000, n_embd=64, intermediate_size=96, n_layer=2, n_head=4, n_kv_head=2,
                       sliding_window=7, max_seq_len=128)
    torch.manual_seed(1)
    return save_model_dir(build_model(cfg), tmp_path / "old", tokenizer=sp_model)


def test_shared_rows_move_bitwise_new_rows_have_init_statistics(old_model_dir, code_tokenizer, sp_model, tmp_path,
                                                                capsys):
    assert main(["swap-tokenizer", str(old_model_dir), str(code_tokenizer), str(tmp_path / "new")]) == 0
    old_pieces, new_pieces = Tokenizer(sp_model).pieces(), Tokenizer(code_tokenizer).pieces()
    shared = set(old_pieces) & set(new_pieces)
    assert 300 < len(shared) < 800  # the two vocabularies overlap, but not entirely
    out = capsys.readouterr().out
    assert f"shared {len(shared)} pieces" in out and f"new {800 - len(shared)} " in out
    assert f"dropped {1000 - len(shared)};" in out and "vocab_size 1,000 -> 800" in out

    old, new = load_file(str(old_model_dir / "model.safetensors")), load_file(str(tmp_path / "new/model.safetensors"))
    assert read_config(tmp_path / "new").vocab_size == 800 and read_config(tmp_path / "new").sliding_window == 7
    assert (tmp_path / "new/tokenizer.model").read_bytes() == code_tokenizer.read_bytes()
    old_id = {p: i for i, p in enumerate(old_pieces)}
    fresh = []
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert new[name].shape == (800, 64)
        for i, piece in enumerate(new_pieces):
            if piece in shared:
                assert torch.equal(new[name][i], old[name][old_id[piece]]), (name, piece)
            else:
                fresh.append(new[name][i])
    for name, value in old.items():  # everything else is untouched
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(new[name], value), name
    fresh = torch.stack(fresh)  # ~500 rows x 64: the init's N(0, 0.02) to within a few percent
    assert abs(fresh.mean().item()) < 0.05 * STD and fresh.std().item() == pytest.approx(STD, rel=0.05)


def test_swapped_model_scores_shared_pieces_as_before(old_model_dir, code_tokenizer, sp_model, tmp_path):
    result = swap_tokenizer(old_model_dir, code_tokenizer, tmp_path / "new")
    assert result.new_vocab_size == 800 and result.shared + result.new == 800
    old_tok, new_tok = Tokenizer(sp_model), Tokenizer(code_tokenizer)
    old_model, new_model = load_model(old_model_dir), load_model(tmp_path / "new")
    new_id = {p: i for i, p in enumerate(new_tok.pieces())}
    # A sequence of shared pieces: the same text under other ids, longer than the window (7).
    pieces = [p for p in old_tok.pieces()[259:] if p in new_id][:40]  # past <unk> <s> </s> and the 256 bytes
    old_ids, new_ids = [old_tok.sp.piece_to_id(p) for p in pieces], [new_id[p] for p in pieces]
    assert sum(o != n for o, n in zip(old_ids, new_ids)) > 30
    with torch.no_grad():
        old_logits = old_model(torch.tensor([old_ids]))[0]
        new_logits = new_model(torch.tensor([new_ids]))[0]
    assert new_logits.shape == (len(new_ids), 800) and torch.isfinite(new_logits).all()
    cols = [(new_id[p], i) for i, p in enumerate(old_tok.pieces()) if p in new_id]
    torch.testing.assert_close(new_logits[:, [n for n, _ in cols]], old_logits[:, [o for _, o in cols]],
                               atol=1e-5, rtol=1e-5)


def test_errors_name_what_is_wrong_and_leave_outputs_alone(old_model_dir, code_tokenizer, tmp_path, capsys,
                                                           monkeypatch):
    with pytest.raises(FileNotFoundError, match="tokenizer not found: .*nope.model"):
        swap_tokenizer(old_model_dir, tmp_path / "nope.model", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        swap_tokenizer(tmp_path, code_tokenizer, tmp_path / "out")
    (old_model_dir / "tokenizer.model").rename(tmp_path / "moved.model")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        swap_tokenizer(old_model_dir, code_tokenizer, tmp_path / "out")
    (tmp_path / "moved.model").rename(old_model_dir / "tokenizer.model")
    small = DanubeConfig(vocab_size=500, n_embd=64, intermediate_size=96, n_layer=1, n_head=4, n_kv_head=2)
    save_model_dir(build_model(small), tmp_path / "small", tokenizer=old_model_dir / "tokenizer.model")
    with pytest.raises(ValueError, match="has 1000 pieces but .*small's vocab_size is 500"):
        swap_tokenizer(tmp_path / "small", code_tokenizer, tmp_path / "out")
    with pytest.raises(FileExistsError, match="is the input model directory"):
        swap_tokenizer(old_model_dir, code_tokenizer, old_model_dir, overwrite=True)
    assert main(["swap-tokenizer", str(old_model_dir), str(code_tokenizer), str(old_model_dir)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["swap-tokenizer", str(tmp_path / "small"), str(code_tokenizer), str(tmp_path / "out")]) == 1
    assert "vocab_size is 500" in capsys.readouterr().err and not (tmp_path / "out").exists()

    out = tmp_path / "out"
    swap_tokenizer(old_model_dir, code_tokenizer, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        swap_tokenizer(old_model_dir, code_tokenizer, out)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("danube.model.io.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        swap_tokenizer(old_model_dir, code_tokenizer, out, overwrite=True, seed=5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_llama2_style_to_mistral_counts_match_an_independent_count(llama2_style_model, mistral_model, tmp_path, capsys):
    """H2O-Danube2's swap: a Llama-2-style (dummy prefix) tokenizer onto the real Mistral one."""
    import re

    import sentencepiece as spm

    cfg = DanubeConfig(vocab_size=1000, n_embd=16, intermediate_size=32, n_layer=1, n_head=2, n_kv_head=1)
    torch.manual_seed(0)
    save_model_dir(build_model(cfg), tmp_path / "old", tokenizer=llama2_style_model)
    assert main(["swap-tokenizer", str(tmp_path / "old"), str(mistral_model), str(tmp_path / "new")]) == 0
    printed = re.search(r"shared ([\d,]+) pieces .* new ([\d,]+) .* dropped ([\d,]+);", capsys.readouterr().out)
    counts = [int(g.replace(",", "")) for g in printed.groups()]
    # Counted from the model files with SentencePiece alone, not with danube's Tokenizer.
    old, new = (spm.SentencePieceProcessor(model_file=str(f)) for f in (llama2_style_model, mistral_model))
    old_pieces = {old.id_to_piece(i) for i in range(old.get_piece_size())}
    new_pieces = {new.id_to_piece(i) for i in range(new.get_piece_size())}
    assert counts == [len(old_pieces & new_pieces), len(new_pieces - old_pieces), len(old_pieces - new_pieces)]
    assert 500 < counts[0] < 1000 and counts[0] + counts[1] == 32000  # byte pieces, specials and common words are shared
    assert read_config(tmp_path / "new").vocab_size == 32000
    # The swapped model's rows for a shared piece are the old model's rows for it.
    before, after = (load_file(str(tmp_path / d / "model.safetensors"))["model.embed_tokens.weight"] for d in ("old", "new"))
    for piece in ("▁the", "<0x0A>", "</s>"):
        assert torch.equal(after[new.piece_to_id(piece)], before[old.piece_to_id(piece)])
