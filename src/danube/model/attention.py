"""Causal, optionally sliding-window, grouped-query attention on three kernels.

All backends compute the same function (Mistral semantics): query i attends key j iff
``j <= i`` and ``i - j < window`` (``window`` keys, the query itself included), and
-- when segment ids are given (packed samples, padding) -- only keys of its own segment.
Positions used for the mask are the RoPE positions, so KV-cached decoding and packing
with restarting positions mask correctly.

* ``flash``: flash-attn 2 (CUDA, optional extra), ``window_size=(W - 1, 0)``.
* ``flex``: FlexAttention with a block mask (CUDA).
* ``sdpa``: ``F.scaled_dot_product_attention``; ``is_causal`` whenever the window cannot
  bind (keeps its flash kernel). When it binds, queries go in blocks, each against only the
  ``window + block`` keys it can reach (:func:`windowed_sdpa`): work grows with
  ``T x window`` instead of ``T x T``. Explicit positions or segments take a full mask.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import torch
import torch.nn.functional as F

from danube.errors import MissingHardware

Tensor = torch.Tensor


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def check_backend_available(requested: str, device_type: str, key: str = "model.attn_backend") -> None:
    """Fail at start, before any work, when the requested kernel cannot run here (not at the first forward).

    ``device_type`` is where the model will run (``cpu``, ``cuda``/``gpu``).
    """
    if requested != "flash":
        return
    missing = []
    if device_type not in ("cuda", "gpu"):
        missing.append(f"a CUDA device (this run is on {device_type})")
    elif not torch.cuda.is_available():
        missing.append("a CUDA device (none is visible)")
    if importlib.util.find_spec("flash_attn") is None:
        missing.append("the flash-attn package (pip install -e '.[gpu]' on a CUDA machine)")
    if missing:
        raise MissingHardware(
            f"{key}=flash needs {' and '.join(missing)}; use {key}=auto (flash-attn where installed, else "
            f"FlexAttention on CUDA, SDPA on CPU) or {key}=sdpa"
        )


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
            raise MissingHardware(
                "attn_backend='flash' needs CUDA and the flash-attn package (pip install -e '.[gpu]'); "
                "use attn_backend=sdpa on this machine"
            )
        if device.type != "cuda":
            raise MissingHardware(f"attn_backend='flash' needs tensors on CUDA, got {device}")
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


def query_block(window: int) -> int:
    """Queries per block in :func:`windowed_sdpa`: each block reads ``window + block`` keys.

    Smaller blocks waste less of their key span on masked keys but copy K/V more often
    (``1 + window / block`` copies). ``window / 4``, at least 32, was the fastest or within
    7% of it for windows of 64 to 1,024 on CPU (bench/step_parts.py), at 5 copies of K/V.
    """
    return max(32, window // 4)


@functools.lru_cache(maxsize=8)
def _block_mask(n_blocks: int, block: int, window: int, batch: int, device: torch.device) -> Tensor:
    """Boolean mask ``(batch * n_blocks, 1, block, window + block)`` for :func:`windowed_sdpa`.

    Block ``i`` holds queries ``i*block + a`` and keys ``i*block - window + c``; Mistral's
    rule ``0 <= q - k < window`` becomes ``a < c <= a + window``, and keys before position
    0 (the front padding) are masked. Four dimensions keep SDPA on its fused CPU kernel.
    """
    a = torch.arange(block, device=device)[:, None]
    c = torch.arange(window + block, device=device)[None]
    first_key = window - torch.arange(n_blocks, device=device)[:, None, None] * block  # c of position 0
    mask = (c > a) & (c <= a + window) & (c >= first_key)  # (n_blocks, block, window + block)
    return mask.expand(batch, -1, -1, -1).reshape(batch * n_blocks, 1, block, window + block)


def windowed_sdpa(q: Tensor, k: Tensor, v: Tensor, window: int, block: int | None = None) -> Tensor:
    """Sliding-window causal SDPA for positions ``0..T-1``, T > window, by query blocks.

    Keys are padded by ``window`` in front and unfolded into overlapping spans, one per
    block of queries, so each query scores ``window + block`` keys rather than T. Same
    function as the full band mask (tests/model/test_attention.py), 1.5-3x faster on CPU.
    ``block``: queries per block (default :func:`query_block`).
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    block = block or query_block(window)
    n = -(-t // block)
    span = window + block
    tail = n * block - t
    q = F.pad(q, (0, 0, 0, tail)).reshape(b, h, n, block, d).transpose(1, 2).reshape(b * n, h, block, d)
    k, v = (F.pad(x, (0, 0, window, tail)).unfold(2, span, block)  # (B, Hkv, n, D, span)
            .permute(0, 2, 1, 4, 3).reshape(b * n, hkv, span, d) for x in (k, v))
    # Under torch.compile the mask is traced as part of the graph rather than cached.
    mask = (_block_mask.__wrapped__ if torch.compiler.is_compiling() else _block_mask)(n, block, window, b, q.device)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h != hkv)  # (B*n, H, block, D)
    return y.reshape(b, n, h, block, d).transpose(1, 2).reshape(b, h, n * block, d)[:, :, :t]


class Layout(NamedTuple):
    """Where the tokens of a pass sit: RoPE positions ``(B, Tq)``/``(B, Tk)`` and segment ids (or None)."""

    q_pos: Tensor
    k_pos: Tensor
    q_seg: Tensor | None = None
    k_seg: Tensor | None = None

    @classmethod
    def of(cls, q: Tensor, k: Tensor, q_pos=None, k_pos=None, q_seg=None, k_seg=None) -> Layout:
        """As given, or keys at ``0..Tk-1`` with the queries the last ``Tq`` of them (a KV cache's new tokens)."""
        if q_pos is None:
            b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
            q_pos = torch.arange(tk - tq, tk, device=q.device).expand(b, tq)
            k_pos = torch.arange(tk, device=q.device).expand(b, tk)
        return cls(q_pos, k_pos, q_seg, k_seg)


def _memoized(memo: dict | None, key: str, build):
    """``build()``, once per ``memo`` (one forward pass: every layer shares one mask)."""
    if memo is None:
        return build()
    if key not in memo:
        memo[key] = build()
    return memo[key]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None, layout: Layout | None = None,
                   memo: dict | None = None) -> Tensor:
    """q ``(B, H, Tq, D)``, k/v ``(B, Hkv, Tk, D)`` -> ``(B, H, Tq, D)``; ``layout`` None: positions ``0..T-1``."""
    gqa = q.shape[1] != k.shape[1]
    if layout is None and q.shape[2] == k.shape[2]:
        if window is None or q.shape[2] <= window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return windowed_sdpa(q, k, v, window)
    layout = layout or Layout.of(q, k)
    mask = _memoized(memo, "mask", lambda: build_mask(*layout[:2], window, *layout[2:]))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return torch.compile(_flex, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None, layout: Layout | None = None,
                   memo: dict | None = None) -> Tensor:
    """FlexAttention with a block mask; same shapes and semantics as :func:`sdpa_attention`.

    The block mask is built once per forward pass (``memo`` is shared by all layers).
    On CUDA the compiled kernel is used; elsewhere the eager (reference) implementation.
    """
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex

    q_pos, k_pos, q_seg, k_seg = layout or Layout.of(q, k)

    def mask_mod(bi, h, qi, ki):
        diff = q_pos[bi, qi] - k_pos[bi, ki]
        keep = diff >= 0
        if window is not None:
            keep = keep & (diff < window)
        if q_seg is not None:
            keep = keep & (q_seg[bi, qi] == k_seg[bi, ki])
        return keep

    block_mask = _memoized(memo, "block_mask", lambda: create_block_mask(
        mask_mod, B=q.shape[0], H=None, Q_LEN=q.shape[2], KV_LEN=k.shape[2], device=q.device))
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
    explicit = q_pos is not None or q_seg is not None
    layout = Layout.of(q, k, q_pos, k_pos, q_seg, k_seg) if explicit else None
    kernel = flex_attention if name == "flex" else sdpa_attention
    return kernel(q, k, v, window, layout, memo)
