"""Logits equal transformers' Llama and Mistral (window shorter than the sequence)."""

import json

import pytest
import torch
import transformers

from danube.hf import config_to_hf, from_hf, to_hf
from danube.model import DanubeConfig, build_model
from danube.model.io import save_model_dir
from danube.model.loading import load_model

T = 45  # > sliding_window=7: the window changes the logits


def hf_model(cfg: DanubeConfig):
    torch.manual_seed(0)
    hf_cfg = config_to_hf(cfg)
    hf_cfg._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()


def assert_same_logits(model, hf, cfg) -> None:
    """danube's logits equal transformers' on random tokens (fp32, eager attention)."""
    ids = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def tokens(cfg, b=2, t=T):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["mistral", "llama"])
def arch_cfg(request, micro_cfg):
    if request.param == "llama":
        return DanubeConfig(**{**micro_cfg.to_dict(), "sliding_window": None, "n_kv_head": 1})
    return micro_cfg


def test_from_hf_matches_transformers(arch_cfg, tmp_path):
    hf = hf_model(arch_cfg)
    hf.save_pretrained(tmp_path / "hf")
    expected_class = "MistralForCausalLM" if arch_cfg.sliding_window else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    model = from_hf(tmp_path / "hf").eval()
    assert model.cfg.sliding_window == arch_cfg.sliding_window
    assert_same_logits(model, hf, arch_cfg)


def test_to_hf_reloads_in_transformers(arch_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch_cfg).eval()
    to_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    expected_class = "MistralForCausalLM" if arch_cfg.sliding_window else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    assert_same_logits(model, hf, arch_cfg)


def test_window_matters_at_this_length(micro_cfg):
    torch.manual_seed(0)
    model = build_model(micro_cfg).eval()
    unwindowed = build_model(DanubeConfig(**{**micro_cfg.to_dict(), "sliding_window": None}), init=False)
    unwindowed.load_state_dict(model.state_dict())
    ids = tokens(micro_cfg)
    with torch.no_grad():
        a, b = model(ids), unwindowed.eval()(ids)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


def test_sharded_safetensors_and_bin(micro_cfg, tmp_path):
    hf = hf_model(micro_cfg)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = tokens(micro_cfg)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(from_hf(tmp_path / "sharded")(ids), ref, atol=1e-4, rtol=1e-4)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with torch.no_grad():
        torch.testing.assert_close(from_hf(tmp_path / "bin")(ids), ref, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_round_trip(micro_cfg, tmp_path):
    cfg = DanubeConfig(**{**micro_cfg.to_dict(), "tie_word_embeddings": True})
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_logits(model, hf, cfg)


def test_native_model_dir_round_trip(micro_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(micro_cfg).eval()
    save_model_dir(model, tmp_path / "m")
    again = load_model(tmp_path / "m").eval()
    ids = tokens(micro_cfg)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)


def test_checkpoint_of_another_shape_names_the_tensor(micro_cfg, tmp_path):
    model = build_model(micro_cfg)
    save_model_dir(model, tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("intermediate_size: 96", "intermediate_size: 128"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"):
        load_model(tmp_path / "m")


def test_unsupported_hf_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "nothing")


def test_backends_agree_in_the_full_model(micro_cfg):
    torch.manual_seed(0)
    model = build_model(micro_cfg).eval()
    ids = tokens(micro_cfg)
    with torch.no_grad():
        ref = model(ids)
        model.cfg.attn_backend = "flex"
        torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)


def test_load_model_reads_both_formats(micro_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(micro_cfg).eval()
    save_model_dir(model, tmp_path / "native")
    to_hf(model, tmp_path / "hf")
    ids = tokens(micro_cfg)
    with torch.no_grad():
        for path in ("native", "hf"):
            torch.testing.assert_close(load_model(tmp_path / path).eval()(ids), model(ids))
    with pytest.raises(FileNotFoundError, match="not a model directory; the model directories in it: .*native"):
        load_model(tmp_path)
