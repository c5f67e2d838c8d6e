"""Every attention backend on this machine against a float64 reference, T > window."""

import importlib.util

import pytest
import torch

from danube.model.attention import attention, build_mask

BACKENDS = ["sdpa", "flex"]


def reference(q, k, v, window, q_pos=None, k_pos=None, q_seg=None, k_seg=None):
    """Naive float64 attention: repeat K/V for GQA, explicit mask, softmax."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    if q_pos is None:
        q_pos = torch.arange(tk - tq, tk).expand(b, tq)
        k_pos = torch.arange(tk).expand(b, tk)
    allowed = torch.zeros(b, 1, tq, tk, dtype=torch.bool)
    for i in range(tq):  # the reference is deliberately the obvious loop
        for j in range(tk):
            d = q_pos[:, i] - k_pos[:, j]
            ok = (d >= 0) & ((d < window) if window is not None else True)
            if q_seg is not None:
                ok &= q_seg[:, i] == k_seg[:, j]
            allowed[:, 0, i, j] = ok
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def qkv(b=2, h=4, hkv=2, t=29, d=16, tk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    tk = tk or t
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, hkv, tk, d, generator=g),
            torch.randn(b, hkv, tk, d, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 1, 5, 29, 64])
def test_causal_window_matches_reference(backend, window):
    q, k, v = qkv()
    out = attention(q, k, v, window=window, backend=backend)
    torch.testing.assert_close(out.double(), reference(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_window_changes_the_result():
    q, k, v = qkv()
    assert not torch.allclose(attention(q, k, v, window=5, backend="sdpa"), attention(q, k, v, window=None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_and_restarting_positions(backend):
    """Packed samples: no attention across segments, positions restart per sample."""
    q, k, v = qkv(t=24)
    seg = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 20 + [2]])
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24).clone()
    pos[1] = torch.cat([torch.arange(3), torch.arange(20), torch.arange(1)])
    out = attention(q, k, v, window=6, backend=backend, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg)
    torch.testing.assert_close(out.double(), reference(q, k, v, 6, pos, pos, seg, seg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_queries_see_window_of_earlier_keys(backend):
    """Decoding: 3 new queries against 40 cached keys with a window of 9."""
    q, k, v = qkv(t=3, tk=40)
    out = attention(q, k, v, window=9, backend=backend)
    torch.testing.assert_close(out.double(), reference(q, k, v, 9), atol=1e-5, rtol=1e-5)


def test_mask_is_mistral_semantics():
    pos = torch.arange(6)[None]
    mask = build_mask(pos, pos, window=3)[0, 0]
    # query 5 sees keys 3, 4, 5: three keys, itself included
    assert mask[5].tolist() == [False, False, False, True, True, True]


def test_flash_without_cuda_is_a_clear_error():
    if importlib.util.find_spec("flash_attn") and torch.cuda.is_available():
        pytest.skip("flash-attn is usable here")
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="flash-attn"):
        attention(q, k, v, window=4, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
@pytest.mark.parametrize("window", [None, 64])
def test_cuda_backends_match_reference(backend, window):
    if backend == "flash" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn not installed")
    q, k, v = qkv(t=200, d=64)
    out = attention(*(x.cuda().bfloat16() for x in (q, k, v)), window=window, backend=backend)
    torch.testing.assert_close(out.cpu().double(), reference(q, k, v, window), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_cuda_segments_match_reference(backend):
    if backend == "flash" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn not installed")
    q, k, v = qkv(t=96, d=64)
    seg = torch.tensor([[0] * 40 + [1] * 56, [0] * 96])
    pos = torch.cat([torch.arange(40), torch.arange(56)]).expand(2, 96).clone()
    pos[1] = torch.arange(96)
    out = attention(*(x.cuda().bfloat16() for x in (q, k, v)), window=16, backend=backend,
                    q_pos=pos.cuda(), k_pos=pos.cuda(), q_seg=seg.cuda(), k_seg=seg.cuda())
    torch.testing.assert_close(out.cpu().double(), reference(q, k, v, 16, pos, pos, seg, seg), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("t,window", [(200, 16), (130, 64), (97, 24), (33, 32)])
def test_windowed_blocks_match_the_full_band_mask_with_gradients(t, window):
    """Query blocks with a ragged last block, several blocks touching the front padding."""
    from danube.model.attention import build_mask, windowed_sdpa

    q, k, v = (x.double().requires_grad_() for x in qkv(b=2, h=4, hkv=2, t=t, d=8))
    pos = torch.arange(t)[None]
    full = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=build_mask(pos, pos, window), enable_gqa=True)
    blocked = windowed_sdpa(q, k, v, window)
    torch.testing.assert_close(blocked, full)
    g = torch.randn_like(full)
    torch.testing.assert_close(torch.autograd.grad(blocked, (q, k, v), g), torch.autograd.grad(full, (q, k, v), g))
