"""Gradient clipping by global norm, done by danube for both training modules rather than by Lightning."""

from __future__ import annotations

import lightning as L
import torch


class ClipsGradients(L.LightningModule):
    """A LightningModule that clips its own gradients (``Trainer(gradient_clip_val=...)``), by global norm.

    Lightning's bf16-mixed plugin refuses to clip for an optimizer that can unscale fp16
    gradients inside its step (the fused AdamW), though bf16 has no scaler, and its FSDP
    plugin refuses norm clipping altogether; neither refusal applies to what is done here,
    so both modules may use the fused AdamW (:func:`danube.optim.adamw`) under any precision.
    The norm before clipping is kept in ``_grad_norm`` (``train/grad_norm``).
    """

    _grad_norm: torch.Tensor | None = None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r}: danube clips by norm only")
        if gradient_clip_val:
            self._grad_norm = self.clip_grad_norm_(float(gradient_clip_val))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their global norm is at most ``max_norm``; returns the norm before.

        torch's, which uses the multi-tensor (foreach) kernels on CUDA. Under FSDP2 each rank
        holds a shard of every gradient (a DTensor) and the norm it computes is reduced over
        all of them. No host sync: the norm stays on the device.
        """
        grads = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
