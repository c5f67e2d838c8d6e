"""LoRA adapters on a Danube model through peft, and merging them back into plain weights.

peft's ``get_peft_model`` wraps any ``nn.Module``; our projection names are Hugging
Face's, so the report's targets (q/k/v/o and the three MLP projections) are plain names.
``lm_head`` is never adapted. The DPO reference model is the same wrapped model under
``with model.disable_adapter():`` -- no second copy of the weights.

An adapter directory is peft's own (``adapter_config.json`` + ``adapter_model.safetensors``);
``base_model_name_or_path`` in it records the model directory the adapter was trained on;
:func:`danube.model.loading.load_adapter` loads one onto that base.
"""

from __future__ import annotations

import logging
from pathlib import Path

from danube.model import Danube

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: Danube, r: int = 4, alpha: int = 16, dropout: float = 0.05,
             target_modules: list[str] | tuple[str, ...] = LORA_TARGETS, base_model: str | Path | None = None):
    """Wrap ``model`` with LoRA adapters; only the adapters are trainable (``lora_B`` starts at zero)."""
    import peft

    targets = list(target_modules)
    if "lm_head" in targets:
        raise ValueError("loss.lora.target_modules: lm_head is never adapted (the report adapts the blocks only)")
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"loss.lora.target_modules: {unknown} are not Danube projections; allowed: {list(LORA_TARGETS)}")
    config = peft.LoraConfig(r=int(r), lora_alpha=int(alpha), lora_dropout=float(dropout), target_modules=targets,
                             bias="none", base_model_name_or_path=None if base_model is None else str(base_model))
    wrapped = peft.get_peft_model(model, config)
    # get_peft_model fills this from the model's `name_or_path`, which a Danube has not.
    wrapped.peft_config["default"].base_model_name_or_path = None if base_model is None else str(base_model)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA r=%d alpha=%d dropout=%.2f on %s: %s trainable of %s parameters", r, alpha, dropout,
             ",".join(targets), f"{trainable:,}", f"{total:,}")
    return wrapped


def merge_lora(wrapped) -> Danube:
    """Fold the adapters into the weights; returns the plain :class:`Danube` (same parameter names)."""
    model = wrapped.merge_and_unload()
    if not isinstance(model, Danube):
        raise TypeError(f"merging gave {type(model).__name__}, expected a Danube model")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_lora_main(argv: list[str]) -> int:
    import argparse

    from danube.model.io import save_model_dir, tokenizer_path

    parser = argparse.ArgumentParser(
        prog="danube merge-lora", description="Merge a LoRA adapter into its base model: a plain danube model directory."
    )
    parser.add_argument("adapter_dir", help="peft adapter directory (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("output", help="danube model directory to write")
    parser.add_argument("--base", help="base model directory (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    args = parser.parse_args(argv)
    from danube.files import check_output_dir
    from danube.model.loading import load_adapter

    check_output_dir(args.output, overwrite=args.overwrite, inputs=[args.adapter_dir] + ([args.base] if args.base else []))
    wrapped, base = load_adapter(args.adapter_dir, args.base)
    check_output_dir(args.output, overwrite=args.overwrite, inputs=[base])
    model = merge_lora(wrapped)
    save_model_dir(model, args.output, tokenizer=tokenizer_path(base))
    print(f"{args.adapter_dir} + {base} -> {args.output}")
    return 0
