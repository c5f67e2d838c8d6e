import pytest
import torch

from danube.model import DanubeConfig, build_model


@pytest.fixture
def model(micro_cfg):
    torch.manual_seed(0)
    return build_model(micro_cfg).eval()


def test_logits_shape_and_dtype(model, micro_cfg):
    ids = torch.randint(0, micro_cfg.vocab_size, (3, 11))
    out = model(ids)
    assert out.shape == (3, 11, micro_cfg.vocab_size) and out.dtype == torch.float32


def test_kv_cache_decoding_equals_full_forward_past_the_window(model, micro_cfg):
    ids = torch.randint(0, micro_cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :25], cache=cache)]  # prefill longer than the window (7)
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_with_segments_leaves_real_tokens_unchanged(model, micro_cfg):
    ids = torch.randint(3, micro_cfg.vocab_size, (1, 20))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    seg = torch.tensor([[0] * 5 + [1] * 20])
    pos = torch.tensor([[0] * 5 + list(range(20))])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, position_ids=pos, segment_ids=seg)[:, 5:], model(ids), atol=1e-5, rtol=1e-5)


def test_packed_samples_do_not_see_each_other(model, micro_cfg):
    a = torch.randint(0, micro_cfg.vocab_size, (1, 12))
    b = torch.randint(0, micro_cfg.vocab_size, (1, 9))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 12 + [1] * 9])
    pos = torch.cat([torch.arange(12), torch.arange(9)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos, segment_ids=seg)
        torch.testing.assert_close(out[:, :12], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 12:], model(b), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(micro_cfg):
    torch.manual_seed(0)
    model = build_model(micro_cfg)
    ids = torch.randint(0, micro_cfg.vocab_size, (2, 16))
    model(ids).logsumexp(-1).mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(ids).logsumexp(-1).mean().backward()
    for g, r in zip((p.grad for p in model.parameters()), ref):
        torch.testing.assert_close(g, r)


def test_init_is_deterministic_and_llama_like():
    cfg = DanubeConfig(vocab_size=500, n_embd=128, intermediate_size=256, n_layer=2, n_head=4, n_kv_head=2)
    torch.manual_seed(3)
    a = build_model(cfg)
    torch.manual_seed(3)
    b = build_model(cfg)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    assert abs(a.model.embed_tokens.weight.std().item() - 0.02) < 0.002
    assert torch.all(a.model.norm.weight == 1)


def test_integer_input_required(model):
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
