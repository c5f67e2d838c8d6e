"""Reading a Hugging Face Llama/Mistral checkpoint directory as a Danube model (no ``transformers`` needed).

Parameter names already match (see :mod:`danube.model.transformer`), so only the
``config.json`` is translated (:func:`config_from_hf`). Weights are read from
``model.safetensors``, sharded safetensors, or ``pytorch_model.bin`` (``weights_only``).
Writing one is :func:`danube.hf.to_hf`; commands load either format through
:func:`danube.model.loading.load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from danube.model.config import DanubeConfig
from danube.model.io import check_finite, load_weights, read_safetensors
from danube.model.transformer import Danube, build_model


SUPPORTED = ("llama", "mistral")


# DanubeConfig field -> Llama/Mistral config.json key (both directions: danube.hf.config_to_hf).
HF_NAMES = {
    "vocab_size": "vocab_size", "n_embd": "hidden_size", "intermediate_size": "intermediate_size",
    "n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
    "head_dim": "head_dim", "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings", "init_std": "initializer_range",
}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> DanubeConfig:
    """Map every architecture field of a Llama/Mistral ``config.json`` to a :class:`DanubeConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; danube reads {SUPPORTED}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; danube's MLP is SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{source}: biased projections are not supported (danube has no biases)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", (scaling or {}).get("rope_type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: rope_type={rope_type!r} is not supported; danube implements plain RoPE")
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if hf.get("use_sliding_window") is False:
        window = None
    n_head = hf["num_attention_heads"]
    return DanubeConfig(
        vocab_size=hf["vocab_size"],
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        sliding_window=window,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: safetensors (sharded or not) or ``.bin``."""
    for index_name, loader in (
        ("model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin.index.json", lambda f: torch.load(f, map_location="cpu", weights_only=True)),
    ):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (path / shard).is_file():
                    raise FileNotFoundError(f"{index} names shard {shard}, which is missing")
                state.update(loader(path / shard))
            return state
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{path}: no weights found (model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def from_hf(path: str | Path, dtype: torch.dtype | None = None, **overrides) -> Danube:
    """Load a Hugging Face Llama or Mistral checkpoint directory as a :class:`Danube` on CPU."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: config.json is missing")
    cfg = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    if overrides:
        cfg = DanubeConfig.from_dict({**cfg.to_dict(), **overrides})
    # Old Llama checkpoints carry the RoPE frequencies as buffers; danube computes them.
    state = {k: v for k, v in _read_state(path).items() if not k.endswith("rotary_emb.inv_freq")}
    check_finite(state, str(path))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model = build_model(cfg, device="meta")
    return load_weights(model, state, str(path))
