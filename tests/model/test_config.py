import pytest
import yaml

from danube.model import DanubeConfig, build_model
from danube.config import model_preset
from tests.conftest import CONF

EXPECTED = {
    "tiny": 4_868_352,
    "proxy_500m": 501_007_872,
    "danube_1p8b": 1_831_201_280,
    "danube2_1p8b": 1_831_201_280,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_count_on_meta(name):
    cfg = model_preset(CONF / "model" / f"{name}.yaml")
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name] == cfg.num_params()


def test_danube_1p8b_is_the_report_architecture():
    cfg = model_preset(CONF / "model" / "danube_1p8b.yaml")
    assert (cfg.n_embd, cfg.intermediate_size, cfg.n_layer, cfg.n_head, cfg.n_kv_head) == (2560, 6912, 24, 32, 8)
    assert (cfg.vocab_size, cfg.sliding_window, cfg.tie_word_embeddings) == (32000, 4096, False)
    danube2 = model_preset(CONF / "model" / "danube2_1p8b.yaml")
    assert danube2.sliding_window is None and danube2.max_seq_len == 8192


def test_model_has_no_biases_and_hf_names():
    model = build_model(DanubeConfig(), device="meta")
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("bias") for n in names)
    for part in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.self_attn.{part}.weight" in names or f"model.layers.0.mlp.{part}.weight" in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert model.lm_head.weight is not model.model.embed_tokens.weight


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_head=32, n_kv_head=5), "not a multiple of n_kv_head"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(attn_backend="cuda"), "attn_backend"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DanubeConfig(**kwargs)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = DanubeConfig(n_layer=3, sliding_window=None)
    assert DanubeConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown DanubeConfig keys"):
        DanubeConfig.from_dict({"hidden": 3})
