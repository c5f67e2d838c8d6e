"""The Danube decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP, blocks, model.

Parameter names follow Hugging Face Llama/Mistral (``model.layers.0.self_attn.q_proj``,
``lm_head``...), so their checkpoints load with ``strict=True`` and no key map.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from danube.model.attention import attention
from danube.model.config import DanubeConfig

Tensor = torch.Tensor
LinearFactory = Callable[[int, int], nn.Module]


def linear_no_bias(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the scale, as Llama does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``(B, T, head_dim)`` for integer positions ``(B, T)`` (computed in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, H, T, D)`` by the half-split convention of Llama checkpoints."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys, values, positions and segment ids of every token decoded so far.

    All keys are kept; the sliding window is applied by the attention mask, so a prompt
    longer than the window decodes exactly as the full forward pass would.
    """

    def __init__(self, n_layer: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.positions: Tensor | None = None  # (B, Tk)
        self.segments: Tensor | None = None  # (B, Tk)

    @property
    def length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def extend_meta(self, positions: Tensor, segments: Tensor) -> None:
        cat = lambda old, new: new if old is None else torch.cat([old, new], dim=1)  # noqa: E731
        self.positions, self.segments = cat(self.positions, positions), cat(self.segments, segments)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, index: Tensor) -> None:
        """Keep only the batch rows in ``index`` (finished sequences dropped)."""
        self.keys = [None if k is None else k[index] for k in self.keys]
        self.values = [None if v is None else v[index] for v in self.values]
        self.positions, self.segments = self.positions[index], self.segments[index]


class Attention(nn.Module):
    def __init__(self, cfg: DanubeConfig, layer_idx: int, linear: LinearFactory) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.q_proj = linear(cfg.n_embd, cfg.n_head * cfg.head_dim)
        self.k_proj = linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim)
        self.v_proj = linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim)
        self.o_proj = linear(cfg.n_head * cfg.head_dim, cfg.n_embd)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask_args: dict, cache: KVCache | None) -> Tensor:
        b, t, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, self.cfg.n_head, d).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.cfg.n_kv_head, d).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.cfg.n_kv_head, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, Tk, D)
        y = attention(q, k, v, window=self.cfg.sliding_window, backend=self.cfg.attn_backend, **mask_args)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, H * D) -> (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DanubeConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.gate_proj = linear(cfg.n_embd, cfg.intermediate_size)
        self.up_proj = linear(cfg.n_embd, cfg.intermediate_size)
        self.down_proj = linear(cfg.intermediate_size, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DanubeConfig, layer_idx: int, linear: LinearFactory) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, linear)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, linear)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask_args: dict, cache: KVCache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask_args, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DanubeModel(nn.Module):
    """Embedding, blocks and final norm: returns hidden states ``(B, T, C)``."""

    def __init__(self, cfg: DanubeConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i, linear) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        b, t = input_ids.shape
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        x = self.embed_tokens(input_ids)  # (B, T, C)
        # Positions drive both RoPE and the mask; the common case (0..T-1, no segments,
        # no cache) passes none so attention can take its fastest path.
        explicit = position_ids is not None or segment_ids is not None or cache is not None
        if position_ids is None:
            start = 0 if cache is None else cache.length
            position_ids = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask_args: dict = {}
        if cache is not None:
            seg = segment_ids if segment_ids is not None else torch.zeros_like(position_ids)
            cache.extend_meta(position_ids, seg)
            mask_args = dict(q_pos=position_ids, k_pos=cache.positions, q_seg=seg, k_seg=cache.segments)
        elif explicit:
            mask_args = dict(q_pos=position_ids, k_pos=position_ids, q_seg=segment_ids, k_seg=segment_ids)
        mask_args["memo"] = {}  # shared by the layers of this pass (e.g. FlexAttention's block mask)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask_args, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask_args, cache)
        return self.norm(x)


class Danube(nn.Module):
    """Decoder-only LM: ``Danube(cfg)(input_ids)`` -> logits ``(B, T, vocab)``.

    ``linear`` builds the seven projections of each block (q/k/v/o, gate/up/down); FP8
    training passes Transformer Engine's ``Linear`` here while ``lm_head`` stays a plain
    ``nn.Linear``. Construction leaves weights as PyTorch's defaults: call
    :meth:`init_weights` (or use :func:`build_model`) for the Llama initialisation.
    """

    def __init__(self, cfg: DanubeConfig, linear: LinearFactory = linear_no_bias) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DanubeModel(cfg, linear)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache: KVCache | None = None,
        hidden: bool = False,
    ) -> Tensor:
        """Logits ``(B, T, vocab)``; with ``hidden``, the final hidden states ``(B, T, C)`` instead.

        Training computes its loss from the hidden states and ``lm_head.weight`` in chunks
        (:func:`danube.losses.chunked_cross_entropy`). It still goes through this method, so that
        a sharded model (FSDP2: :mod:`danube.model.sharding`) gathers its root parameters here.
        """
        out = self.model(input_ids, position_ids, segment_ids, cache)
        return out if hidden else self.lm_head(out)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Llama initialisation: N(0, init_std) for every matrix, ones for the norms."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Embedding) or hasattr(module, "weight") and module.weight.ndim == 2:
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled


def build_model(
    cfg: DanubeConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    linear: LinearFactory = linear_no_bias,
    init: bool = True,
) -> Danube:
    """Build on the meta device, then allocate on ``device`` and initialise once.

    ``device="meta"`` returns a shape-only model (instant, even for 1.8B parameters).
    """
    with torch.device("meta"):
        model = Danube(cfg, linear)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty re-creates parameters: re-tie
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model = model.to(dtype)
    if init:
        model.init_weights()
    return model
