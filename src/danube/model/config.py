"""The architecture of a Danube model as one typed, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ATTN_BACKENDS = ("auto", "sdpa", "flex", "flash")


def _doc(default: Any, doc: str) -> Any:
    """A field with a line of documentation (the README's table of settings shows it)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass
class DanubeConfig:
    """Decoder-only Llama 2 / Mistral architecture.

    The defaults are H2O-Danube-1.8B (report, section 3): 1,831,201,280 parameters.
    """

    vocab_size: int = _doc(32_000, "embedding rows: at least the tokenizer's pieces")
    n_embd: int = _doc(2560, "hidden size")
    intermediate_size: int = _doc(6912, "SwiGLU MLP width")
    n_layer: int = _doc(24, "transformer blocks")
    n_head: int = _doc(32, "query heads")
    n_kv_head: int = _doc(8, "key/value heads (GQA: 4 query heads share one K/V head)")
    head_dim: int | None = _doc(None, "derived: n_embd // n_head")
    sliding_window: int | None = _doc(4096, "keys per query, the query itself included (Mistral); null: none")
    max_seq_len: int = _doc(16_384, "longest context trained or generated (RoPE positions)")
    rope_theta: float = _doc(10_000.0, "RoPE base")
    rms_norm_eps: float = _doc(1e-5, "RMSNorm epsilon")
    tie_word_embeddings: bool = _doc(False, "lm_head shares embed_tokens' weights (danube: untied)")
    init_std: float = _doc(0.02, "std of the normal initialisation")
    # Not architecture: which attention kernel computes it (all compute the same function).
    attn_backend: str = _doc("auto", "auto | sdpa | flex | flash: the kernel, not the function")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_embd", "intermediate_size", "n_layer", "n_head", "n_kv_head", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DanubeConfig.{name}={value!r} must be a positive integer")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"DanubeConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"DanubeConfig: n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"DanubeConfig.head_dim={self.head_dim} must be a positive even integer (RoPE)")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"DanubeConfig.sliding_window={self.sliding_window!r} must be >= 1 or None (no window)")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("DanubeConfig: rope_theta and rms_norm_eps must be positive")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"DanubeConfig.attn_backend={self.attn_backend!r}; allowed: {', '.join(ATTN_BACKENDS)}")

    @property
    def kv_groups(self) -> int:
        return self.n_head // self.n_kv_head

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shapes alone (no model needed)."""
        d, kv = self.n_embd, self.n_kv_head * self.head_dim
        q = self.n_head * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        total = self.n_layer * per_layer + d + head
        return total + embed if include_embedding else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x non-embedding params + attention over the keys each query sees."""
        keys = seq_len if self.sliding_window is None else min(seq_len, self.sliding_window)
        return 6 * self.num_params(include_embedding=False) + 12 * self.n_layer * self.n_head * self.head_dim * keys

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DanubeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DanubeConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)
