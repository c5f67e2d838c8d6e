"""Causal, optionally sliding-window, grouped-query attention on three kernels.

All backends compute the same function (Mistral semantics): query i attends key j iff
``j <= i`` and ``i - j < window`` (``window`` keys, the query itself included), and
-- when segment ids are given (packed samples, padding) -- only keys of its own segment.
Positions used for the mask are the RoPE positions, so KV-cached decoding and packing
with restarting positions mask correctly.

* ``flash``: flash-attn 2 (CUDA, optional extra), ``window_size=(W - 1, 0)``.
* ``flex``: FlexAttention with a block mask (CUDA).
* ``sdpa``: ``F.scaled_dot_product_attention``; ``is_causal`` whenever the window cannot
  bind (keeps its flash kernel), otherwise a boolean band mask built by broadcasting.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_backend(requested: str, device: torch.device, *, has_segments: bool, has_cache: bool) -> str:
    """Pick the kernel: the fastest available unless ``requested`` names one."""
    if requested == "auto":
        if device.type != "cuda" or has_cache:
            return "sdpa"
        if flash_attn_available() and not has_segments:
            return "flash"
        return "flex"
    if requested == "flash":
        if not flash_attn_available():
            raise RuntimeError(
                "attn_backend='flash' needs CUDA and the flash-attn package (pip install -e '.[gpu]'); "
                "use attn_backend=sdpa on this machine"
            )
        if device.type != "cuda":
            raise RuntimeError(f"attn_backend='flash' needs tensors on CUDA, got {device}")
    # "flex" is allowed off CUDA: it runs eagerly (slowly) on CPU, so its tests run anywhere.
    return requested


def build_mask(
    q_pos: Tensor, k_pos: Tensor, window: int | None, q_seg: Tensor | None = None, k_seg: Tensor | None = None
) -> Tensor:
    """Boolean mask ``(B, 1, Tq, Tk)``, True where a query may attend a key."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # (B, Tq, Tk)
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask[:, None]


@functools.lru_cache(maxsize=8)
def _band_mask(t: int, window: int, device: torch.device) -> Tensor:
    """Boolean band mask ``(1, 1, T, T)``: broadcasts over batch and heads.

    Four dimensions keep SDPA on its fused CPU kernel; a 3-D mask sends it to the math
    path (scores materialised), ~1.9x slower for the tiny model (bench/step_parts.py).
    """
    pos = torch.arange(t, device=device)[None]
    return build_mask(pos, pos, window)


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    q_seg: Tensor | None = None,
    k_seg: Tensor | None = None,
    memo: dict | None = None,
) -> Tensor:
    """q ``(B, H, Tq, D)``, k/v ``(B, Hkv, Tk, D)`` -> ``(B, H, Tq, D)``."""
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q_pos is None and q_seg is None and tq == tk:
        if window is None or tq <= window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_band_mask(tq, window, q.device), enable_gqa=gqa)
    mask = None if memo is None else memo.get("mask")
    if mask is None:
        if q_pos is None:
            q_pos = torch.arange(tk - tq, tk, device=q.device).expand(q.shape[0], tq)
            k_pos = torch.arange(tk, device=q.device).expand(q.shape[0], tk)
        mask = build_mask(q_pos, k_pos, window, q_seg, k_seg)
        if memo is not None:
            memo["mask"] = mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return torch.compile(_flex, dynamic=False)


def flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    q_seg: Tensor | None = None,
    k_seg: Tensor | None = None,
    memo: dict | None = None,
) -> Tensor:
    """FlexAttention with a block mask; same shapes and semantics as :func:`sdpa_attention`.

    The block mask is built once per forward pass (``memo`` is shared by all layers).
    On CUDA the compiled kernel is used; elsewhere the eager (reference) implementation.
    """
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex

    b, _, tq, _ = q.shape
    tk = k.shape[2]
    block_mask = None if memo is None else memo.get("block_mask")
    if block_mask is None:
        if q_pos is None:
            q_pos = torch.arange(tk - tq, tk, device=q.device).expand(b, tq)
            k_pos = torch.arange(tk, device=q.device).expand(b, tk)

        def mask_mod(bi, h, qi, ki):
            diff = q_pos[bi, qi] - k_pos[bi, ki]
            keep = diff >= 0
            if window is not None:
                keep = keep & (diff < window)
            if q_seg is not None:
                keep = keep & (q_seg[bi, qi] == k_seg[bi, ki])
            return keep

        block_mask = create_block_mask(mask_mod, B=b, H=None, Q_LEN=tq, KV_LEN=tk, device=q.device)
        if memo is not None:
            memo["block_mask"] = block_mask
    kernel = _compiled_flex() if q.is_cuda else _flex
    return kernel(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def flash_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None, q_seg: Tensor | None = None) -> Tensor:
    """flash-attn 2; segments (packed samples) go through the varlen kernel."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window_size = (-1, -1) if window is None else (window - 1, 0)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, T, H, D)
    b, t = q.shape[:2]
    if q_seg is None:
        out = flash_attn_func(q, k, v, causal=True, window_size=window_size)
        return out.transpose(1, 2)
    # A new sequence starts at each row start and wherever the segment id changes.
    starts = torch.ones(b, t, dtype=torch.bool, device=q.device)
    starts[:, 1:] = q_seg[:, 1:] != q_seg[:, :-1]
    idx = torch.nonzero(starts.flatten(), as_tuple=True)[0].to(torch.int32)
    cu = torch.cat([idx, torch.tensor([b * t], dtype=torch.int32, device=q.device)])
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, max_len, max_len,
        causal=True, window_size=window_size,
    )
    return out.view(b, t, *out.shape[1:]).transpose(1, 2)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None,
    backend: str = "auto",
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    q_seg: Tensor | None = None,
    k_seg: Tensor | None = None,
    memo: dict | None = None,
) -> Tensor:
    """Dispatch to a kernel. q ``(B, H, Tq, D)``, k/v ``(B, Hkv, Tk, D)`` -> ``(B, H, Tq, D)``.

    ``q_pos``/``k_pos`` (``(B, Tq)``/``(B, Tk)``) are only needed when positions are not
    ``0..T-1`` (KV cache, packing with restarts); ``q_seg``/``k_seg`` restrict attention
    to equal segment ids; ``memo`` lets the layers of one forward pass share mask work.
    """
    cached = k.shape[2] != q.shape[2]
    name = resolve_backend(backend, q.device, has_segments=q_seg is not None, has_cache=cached)
    if name == "flash":
        if cached:
            raise RuntimeError("attn_backend='flash' does not serve KV-cached decoding; use sdpa or auto")
        return flash_attention(q, k, v, window, q_seg)
    if name == "flex":
        return flex_attention(q, k, v, window, q_pos, k_pos, q_seg, k_seg, memo)
    return sdpa_attention(q, k, v, window, q_pos, k_pos, q_seg, k_seg, memo)
