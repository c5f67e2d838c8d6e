"""FP8 through torchao on CPU: which modules are converted, and the checks before any compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from danube.lit.pretrain import PretrainModule
from danube.model import DanubeConfig, build_model
from danube.precision import FP8_PROJECTIONS, PrecisionConfig, convert_to_float8, fp8_modules, is_block_projection

pytest.importorskip("torchao", reason="torchao is the fp8 extra (pip install -e '.[fp8]')")

TINY = DanubeConfig(vocab_size=96, n_embd=64, intermediate_size=96, n_layer=2, n_head=4, n_kv_head=2,
                    sliding_window=8, max_seq_len=64)


def block_projections(cfg: DanubeConfig) -> set[str]:
    return {f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
            for i in range(cfg.n_layer) for p in FP8_PROJECTIONS}


def test_the_seven_projections_of_every_block_are_converted_and_lm_head_is_not():
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    model = build_model(TINY)
    keys = set(model.state_dict())
    converted = convert_to_float8(model, emulate=True)
    assert set(converted) == set(fp8_modules(model)) == block_projections(TINY)
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in converted)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert set(model.state_dict()) == keys  # checkpoints and model directories keep their names


def test_the_report_model_converts_its_small_kv_projections_too():
    """danube_1p8b's k/v projections are 2560 -> 640: torchao's automatic filter would leave them out."""
    cfg = DanubeConfig()
    model = build_model(cfg, device="meta")
    converted = convert_to_float8(model)
    assert len(converted) == 7 * 24 and "model.layers.23.self_attn.k_proj" in converted
    assert model.get_submodule("model.layers.0.self_attn.v_proj").weight.shape == (640, 2560)
    assert "lm_head" not in fp8_modules(model)


@pytest.mark.parametrize("fqn, kind, expected", [
    ("model.layers.0.self_attn.k_proj", nn.Linear, True),
    ("layers.11.mlp.down_proj", nn.Linear, True),
    ("lm_head", nn.Linear, False),
    ("model.layers.0.mlp", nn.Linear, False),
    ("q_proj", nn.Linear, False),  # not inside a block
    ("model.layers.0.self_attn.q_proj", nn.Embedding, False),
])
def test_module_filter(fqn, kind, expected):
    module = nn.Linear(16, 16) if kind is nn.Linear else nn.Embedding(16, 16)
    assert is_block_projection(module, fqn) is expected


def test_a_projection_fp8_cannot_multiply_is_named():
    model = build_model(DanubeConfig(**{**TINY.to_dict(), "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj is 64 -> 40; .*divisible by 16"):
        convert_to_float8(model)


def test_emulated_fp8_forward_and_backward_track_full_precision():
    """torchao's emulation casts to FP8 as the GPU kernels do and multiplies in fp32: CPU-runnable."""
    torch.manual_seed(0)
    ref = build_model(TINY)
    model = build_model(TINY)
    model.load_state_dict(ref.state_dict())
    convert_to_float8(model, emulate=True)
    tokens = torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    losses, logits = [], []
    for m in (ref, model):
        logits.append(m(tokens[:, :-1]))
        loss = nn.functional.cross_entropy(logits[-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    error = ((logits[1] - logits[0]).norm() / logits[0].norm()).item()
    assert 1e-3 < error < 0.1  # quantised (E4M3 keeps ~2 significant digits), and not more than that
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    for name in block_projections(TINY):
        g, g_ref = model.get_submodule(name).weight.grad, ref.get_submodule(name).weight.grad
        assert torch.nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(), dim=0) > 0.98, name


def test_pretrain_module_converts_with_backend_torchao():
    args = dict(model=TINY.to_dict(), optim=dict(lr=1e-3, min_lr=1e-4, warmup_tokens=10, betas=[0.9, 0.95], eps=1e-8,
                                                 weight_decay=0.1, grad_clip=1.0, fused=False),
                total_tokens=1000, seq_len=32)
    module = PretrainModule(**args, precision={"trainer_precision": "bf16-mixed", "fp8": True, "backend": "torchao"})
    module.configure_model()
    assert module.fp8_backend == "torchao" and not module.fp8  # no Transformer Engine autocast
    assert set(fp8_modules(module.model)) == block_projections(TINY)
    assert type(module.model.lm_head) is nn.Linear
    plain = PretrainModule(**args, precision={"trainer_precision": "bf16-mixed", "fp8": False})
    plain.configure_model()
    assert plain.fp8_backend is None and fp8_modules(plain.model) == []


def test_backend_defaults_to_transformer_engine_and_unknown_ones_are_named():
    assert PrecisionConfig(fp8=True).fp8_backend == "te"
    assert PrecisionConfig(fp8=False, backend="torchao").fp8_backend is None
    with pytest.raises(ValueError, match="precision.backend='fp8lib'; allowed: te, torchao"):
        PrecisionConfig(fp8=True, backend="fp8lib")
