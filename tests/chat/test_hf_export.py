"""A chat model exported here behaves in transformers as it does here: template, decoding, answers."""

from __future__ import annotations

import io
import json

import pytest
import torch

from danube.cli import main
from danube.data.chat import hf_chat_template
from danube.data.tokenizer import Tokenizer
from danube.hf import REPORT_GENERATION, to_hf
from danube.model import DanubeConfig, build_model
from danube.model.io import CHAT_TEMPLATE_FILE, GENERATION_FILE, save_model_dir


def chat_model(tok: Tokenizer, seed: int = 0):
    """A random model with sharp logits that never picks byte pieces (their text is not valid UTF-8 alone)."""
    torch.manual_seed(seed)
    model = build_model(DanubeConfig(vocab_size=tok.vocab_size, n_embd=64, intermediate_size=128, n_layer=2, n_head=4,
                                     n_kv_head=2, sliding_window=32, max_seq_len=256))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
        model.lm_head.weight[[i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]] = 0
    return model


@pytest.fixture(scope="module", params=["mistral_model", "sp_model"])
def exported(request, tmp_path_factory):
    tok = Tokenizer(request.getfixturevalue(request.param))
    root = tmp_path_factory.mktemp("export")
    save_model_dir(chat_model(tok), root / "model", tokenizer=tok.model_file)
    assert main(["export-hf", str(root / "model"), str(root / "hf")]) == 0
    return tok, root / "model", root / "hf"


def test_export_writes_the_report_s_decoding_and_the_danube_template(exported):
    tok, _, hf_dir = exported
    gen = json.loads((hf_dir / GENERATION_FILE).read_text())
    assert gen["do_sample"] is False and gen["repetition_penalty"] == 1.1
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert "max_new_tokens" not in gen  # it would override the max_length lm-eval's `hf` passes
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == hf_chat_template() and config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_import_keeps_generation_config_and_chat_template_through_export(exported, tmp_path):
    _, _, hf_dir = exported
    # A checkpoint of someone else's: its own decoding and template must survive import -> export.
    gen = {**json.loads((hf_dir / GENERATION_FILE).read_text()), "repetition_penalty": 1.3, "top_k": 7}
    template = hf_chat_template().replace("<|answer|>", "<|assistant|>")
    theirs = tmp_path / "theirs"
    assert main(["export-hf", str(exported[1]), str(theirs)]) == 0
    (theirs / GENERATION_FILE).write_text(json.dumps(gen))
    config = json.loads((theirs / "tokenizer_config.json").read_text())
    (theirs / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    assert main(["import-hf", str(theirs), str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / CHAT_TEMPLATE_FILE).read_text() == template
    assert main(["export-hf", str(tmp_path / "model"), str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / GENERATION_FILE).read_text()) == gen
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["chat_template"] == template
    # A template saved apart (transformers 5's chat_template.jinja) is found too.
    (theirs / CHAT_TEMPLATE_FILE).write_text("{{ 'x' }}")
    assert main(["import-hf", str(theirs), str(tmp_path / "model2")]) == 0
    assert (tmp_path / "model2" / CHAT_TEMPLATE_FILE).read_text() == "{{ 'x' }}"


def test_to_hf_without_a_tokenizer_still_writes_a_generation_config(tmp_path):
    model = build_model(DanubeConfig(vocab_size=64, n_embd=16, intermediate_size=32, n_layer=1, n_head=2, n_kv_head=1))
    to_hf(model, tmp_path / "hf")
    gen = json.loads((tmp_path / "hf" / GENERATION_FILE).read_text())
    assert {k: gen[k] for k in REPORT_GENERATION} == REPORT_GENERATION and gen["eos_token_id"] == 2
    assert not (tmp_path / "hf" / "tokenizer_config.json").exists()


def test_transformers_generate_answers_as_danube_chat(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model_dir, hf_dir = exported
    turns = ["Hello there, what is a list?", " and a tuple "]
    out = io.StringIO()
    from danube.eval.console import chat_main

    assert chat_main([str(model_dir), "--max-new-tokens", "12", "--device", "cpu"],
                     stdin=io.StringIO("".join(t + "\n" for t in turns)), stdout=out) == 0
    ours = [line.removeprefix("assistant> ") for line in out.getvalue().splitlines() if line.startswith("assistant> ")]

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    history, theirs = [], []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        enc = hf_tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():  # greedy and repetition penalty 1.1 come from generation_config.json
            new = hf_model.generate(**enc, max_new_tokens=12)[0, enc["input_ids"].shape[1]:]
        answer = hf_tok.decode(new, skip_special_tokens=True).strip()
        theirs.append(answer)
        history.append({"role": "assistant", "content": answer})
    assert ours == theirs and all(ours)


def test_lm_eval_adapter_takes_the_repetition_penalty_transformers_would(exported, tmp_path):
    import shutil

    from danube.eval.lm_eval_adapter import DanubeLM
    from danube.eval.inference import default_repetition_penalty

    _, model_dir, hf_dir = exported
    assert default_repetition_penalty(model_dir) == default_repetition_penalty(hf_dir) == 1.1
    bare = shutil.copytree(hf_dir, tmp_path / "bare")
    (bare / GENERATION_FILE).unlink()
    assert default_repetition_penalty(bare) == 1.0  # transformers' own default, as `hf` would use
    (bare / GENERATION_FILE).write_text("[1.3]")
    with pytest.raises(ValueError, match="generation_config.json"):
        default_repetition_penalty(bare)
    assert DanubeLM(str(model_dir)).repetition_penalty == 1.1
    assert DanubeLM(str(model_dir), repetition_penalty=1.0).repetition_penalty == 1.0
