"""FP8 through NVIDIA Transformer Engine, built by danube itself.

Lightning's ``precision="transformer-engine"`` swaps every eligible ``nn.Linear`` --
``lm_head`` included. The report keeps ``lm_head`` in bf16, so danube builds
``te.Linear`` only for the seven projections of each block and runs the blocks under
``fp8_autocast``; ``lm_head`` stays a plain ``nn.Linear`` under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from danube.errors import MissingHardware

FP8_FORMATS = ("hybrid", "e4m3")


def check_fp8_available() -> None:
    """Fail before any compute when FP8 is asked for where it cannot run."""
    if not torch.cuda.is_available():
        raise MissingHardware("precision=fp8 needs a CUDA GPU (Hopper or newer); use precision=bf16 or fp32 here")
    if importlib.util.find_spec("transformer_engine") is None:
        raise MissingHardware(
            "precision=fp8 needs NVIDIA Transformer Engine: pip install -e '.[gpu]' "
            "(transformer-engine[pytorch]); or use precision=bf16"
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise MissingHardware(f"precision=fp8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is {major}.{minor}")


def _recipe(precision: dict):
    from transformer_engine.common.recipe import DelayedScaling, Format

    fmt = precision.get("fp8_format", "hybrid")
    if fmt not in FP8_FORMATS:
        raise ValueError(f"precision.fp8_format={fmt!r}; allowed: {FP8_FORMATS}")
    return DelayedScaling(
        fp8_format=Format.HYBRID if fmt == "hybrid" else Format.E4M3,
        amax_history_len=int(precision.get("amax_history_len", 1024)),
        amax_compute_algo=precision.get("amax_compute_algo", "max"),
    )


def te_linear_factory(precision: dict):
    """A ``linear(in, out)`` factory building bias-free ``te.Linear`` layers."""
    check_fp8_available()
    import transformer_engine.pytorch as te

    def linear(in_features: int, out_features: int) -> torch.nn.Module:
        return te.Linear(in_features, out_features, bias=False)

    return linear


def fp8_autocast(enabled: bool, precision: dict | None):
    """TE's fp8 autocast when enabled, a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    return te.fp8_autocast(enabled=True, fp8_recipe=_recipe(precision or {}))
