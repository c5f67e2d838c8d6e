"""The one way a model is loaded: a danube model directory, a Hugging Face directory, a LoRA adapter.

Every command that reads a model (``finetune.py``, ``evaluate.py``, ``danube chat``,
``generate``, ``export-hf``, ``merge-lora``, ``swap-tokenizer``) comes through
:func:`load_model`, or :func:`load_adapter`, which loads the adapter's base through it. So
every one makes the same checks, in this order, before any weight is read:

* the path: a model directory, else an error saying what it is instead (missing, a file, a
  run directory naming the model directories inside it, a LoRA adapter naming its base;
  :func:`danube.model.io.check_model_dir`);
* the device (:func:`resolve_device`): ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``,
  the same values for ``evaluate.py device=`` as for ``danube chat --device``; a device
  this machine does not have is :class:`danube.errors.MissingHardware`;
* the dtype (:func:`resolve_dtype`): ``float32``, ``bfloat16`` or ``float16``;
* the weights: checksums (a danube directory records them), finiteness, names and shapes
  against the config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from danube.errors import MissingHardware
from danube.model.config import DanubeConfig
from danube.model.io import (ADAPTER_CONFIG_FILE, WEIGHTS_FILE, check_model_dir, find_under, is_model_dir, load_weights,
                             read_config, read_weights)
from danube.model.transformer import Danube, build_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(device: str | torch.device = "auto", what: str = "device") -> torch.device:
    """The device a model is loaded onto; ``auto`` is CUDA when there is one, else the CPU.

    Raises:
        ValueError: not one of :data:`DEVICES`.
        MissingHardware: a CUDA (or MPS) device this machine does not have.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{what}={device!r}; allowed: {', '.join(DEVICES)}") from err
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{what}={device!r}; allowed: {', '.join(DEVICES)}")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MissingHardware(f"{what}={device}: no CUDA device is visible on this machine; use {what}=cpu "
                                  f"(or {what}=auto)")
        if resolved.index is not None and resolved.index >= count:
            raise MissingHardware(f"{what}={device}: this machine has {count} CUDA device(s), cuda:0 to "
                                  f"cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise MissingHardware(f"{what}={device}: no MPS device on this machine; use {what}=cpu (or {what}=auto)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """``float32`` / ``bfloat16`` / ``float16`` (or the torch dtype itself); None keeps the stored dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise ValueError(f"{what}={dtype}; allowed: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"{what}={dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    what: str = "",
    hf: bool = True,
    **overrides,
) -> Danube:
    """A danube model directory or (with ``hf``) a Hugging Face Llama/Mistral directory, as a :class:`Danube`.

    Args:
        path: the directory.
        device: where the weights go (see :func:`resolve_device`).
        dtype: the weights' dtype (see :func:`resolve_dtype`; None: as stored).
        what: the option ``path`` came from (``model_dir``), for the messages.
        hf: whether a Hugging Face directory is accepted (``export-hf`` reads danube ones only).
        overrides: config fields to replace (e.g. ``attn_backend``).
    """
    path = check_model_dir(path, what, hf=hf)
    target = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if is_model_dir(path):
        cfg = read_config(path)
        if overrides:
            cfg = DanubeConfig.from_dict({**cfg.to_dict(), **overrides})
        state = read_weights(path, target)  # checksum-verified, finite
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        return load_weights(build_model(cfg, device="meta"), state, str(path / WEIGHTS_FILE))
    from danube.model.hf_io import from_hf

    return from_hf(path, dtype=dtype, **overrides).to(target)


def load_adapter(adapter_dir: str | Path, base: str | Path | None = None, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = torch.float32):
    """The base model (``base``, or the adapter's ``base_model_name_or_path``) with a LoRA adapter on it.

    Returns:
        ``(peft model, the base model's directory)``.
    """
    import peft

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG_FILE
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: no such directory")
    if not config_file.is_file():
        inside = find_under(adapter_dir, lambda d: (d / ADAPTER_CONFIG_FILE).is_file())
        where = f"; the adapter directories in it: {', '.join(map(str, inside))}" if inside else ""
        raise FileNotFoundError(
            f"{adapter_dir} is not a LoRA adapter directory: {ADAPTER_CONFIG_FILE} is missing{where}")
    if base is None:
        try:
            base = json.loads(config_file.read_text()).get("base_model_name_or_path")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{config_file}: not a JSON object: {err}") from err
        if not base:
            raise ValueError(f"{config_file} names no base model; pass --base MODEL_DIR")
    model = load_model(base, device=device, dtype=dtype)
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)), Path(base)
