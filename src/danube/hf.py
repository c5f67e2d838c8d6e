"""Hugging Face interop: Llama/Mistral checkpoint directories to and from Danube models, and the commands.

Parameter names already match (see :mod:`danube.model.transformer`), so only the config
is translated. Reading (:mod:`danube.model.hf_io`, re-exported here) needs no
``transformers``; writing uses its config classes so the ``config.json`` is exactly what
its installed version expects.

An export also writes ``generation_config.json`` (the report's decoding: greedy,
repetition penalty 1.1) and, with a tokenizer, the tokenizer files with the H2O-Danube
chat template (:func:`danube.data.tokenizer.save_hf_tokenizer`). An import keeps the
checkpoint's own ``generation_config.json`` and chat template in the model directory, and
the next export writes them back unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from danube.files import atomic_dir, check_output_dir
from danube.model import Danube, DanubeConfig
from danube.model.hf_io import HF_NAMES, SUPPORTED, config_from_hf, from_hf
from danube.model.io import CHAT_TEMPLATE_FILE, GENERATION_FILE, saved_state

__all__ = ["REPORT_GENERATION", "SUPPORTED", "config_from_hf", "config_to_hf", "from_hf", "generation_config", "to_hf"]

log = logging.getLogger(__name__)

# Report, section 5 (MT-Bench): "repetition_penalty = 1.1 and temperature = 0.0". No length:
# max_new_tokens would override the max_length callers such as lm-eval pass, and a max_length
# makes transformers warn on every call that passes max_new_tokens.
REPORT_GENERATION = {"do_sample": False, "repetition_penalty": 1.1}


def config_to_hf(cfg: DanubeConfig, dtype: torch.dtype = torch.float32):
    """The ``transformers`` config: Mistral when there is a window, Llama otherwise."""
    from transformers import LlamaConfig, MistralConfig

    common = {hf_key: getattr(cfg, field) for field, hf_key in HF_NAMES.items()}
    common.update(hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype=dtype)
    if cfg.sliding_window is not None:
        hf = MistralConfig(sliding_window=cfg.sliding_window, **common)
        hf.architectures = ["MistralForCausalLM"]
    else:
        hf = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        hf.architectures = ["LlamaForCausalLM"]
    return hf


def generation_config(tokenizer=None):
    """``transformers`` ``GenerationConfig``: :data:`REPORT_GENERATION` and the tokenizer's bos/eos/pad ids."""
    from transformers import GenerationConfig

    ids = {"bos_token_id": 1, "eos_token_id": 2}  # what config_to_hf writes
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id if tokenizer.bos_id >= 0 else None, "eos_token_id": tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id}
    return GenerationConfig(**REPORT_GENERATION, **ids)


def to_hf(
    model: Danube,
    path: str | Path,
    tokenizer: str | Path | None = None,
    *,
    chat_template: str | None = None,
    generation: str | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face directory (config.json, generation_config.json, model.safetensors [+ tokenizer]).

    Args:
        model: The model.
        path: The directory to write (to a temporary sibling, then renamed).
        tokenizer: A SentencePiece model file; its Hugging Face files are written beside
            the weights (see :func:`danube.data.tokenizer.save_hf_tokenizer`).
        chat_template: The tokenizer's chat template; default the H2O-Danube format.
        generation: The text of ``generation_config.json``; default :func:`generation_config`.
    """
    from danube.data.tokenizer import Tokenizer, check_exportable, save_hf_tokenizer

    tok = Tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None:
        check_exportable(tok)  # before the weights are written
    with atomic_dir(path) as tmp:
        state = saved_state(model)
        config_to_hf(model.cfg, next(iter(state.values())).dtype).save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if generation is not None:
            (tmp / GENERATION_FILE).write_text(generation, encoding="utf-8")
        else:
            generation_config(tok).save_pretrained(tmp)
        if tok is not None:
            save_hf_tokenizer(tok, tmp, chat_template=chat_template)
    log.info("wrote Hugging Face checkpoint %s", path)
    return Path(path)


def hf_chat_template_of(path: str | Path) -> str | None:
    """The chat template a Hugging Face directory carries (``tokenizer_config.json`` or ``chat_template.jinja``)."""
    path = Path(path)
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file}: not a JSON object: {err}") from err
    if isinstance(template, list):  # named templates: [{name, template}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{config_file}: chat_template must be a string or a list of {{name, template}}")
    return template


def kept_files(path: str | Path) -> dict[str, str]:
    """The generation config and chat template of a directory (Hugging Face or danube), by danube file name."""
    path = Path(path)
    kept = {}
    if (path / GENERATION_FILE).is_file():
        kept[GENERATION_FILE] = (path / GENERATION_FILE).read_text(encoding="utf-8")
    template = hf_chat_template_of(path)
    if template is not None:
        kept[CHAT_TEMPLATE_FILE] = template
    return kept


def import_hf_main(argv: list[str]) -> int:
    import argparse

    from danube.model.io import save_model_dir

    parser = argparse.ArgumentParser(prog="danube import-hf", description="Hugging Face directory -> danube model directory")
    parser.add_argument("hf_dir", help="directory with config.json and weights (safetensors, sharded or not, or .bin)")
    parser.add_argument("model_dir", help="danube model directory to write (config.yaml, model.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty MODEL_DIR")
    args = parser.parse_args(argv)
    check_output_dir(args.model_dir, overwrite=args.overwrite, inputs={"input Hugging Face directory": args.hf_dir})
    model = from_hf(args.hf_dir)
    tokenizer = Path(args.hf_dir) / "tokenizer.model"
    save_model_dir(model, args.model_dir, tokenizer=tokenizer if tokenizer.is_file() else None,
                   extra_files=kept_files(args.hf_dir))
    print(f"{args.hf_dir} -> {args.model_dir}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0


def export_hf_main(argv: list[str]) -> int:
    import argparse

    from danube.model.loading import load_model
    from danube.model.io import tokenizer_path

    parser = argparse.ArgumentParser(prog="danube export-hf", description="danube model directory -> Hugging Face directory")
    parser.add_argument("model_dir", help="danube model directory (config.yaml, model.safetensors[, tokenizer.model])")
    parser.add_argument("hf_dir", help="Hugging Face directory to write")
    parser.add_argument("--tokenizer", help="SentencePiece model to include (default: the model directory's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty HF_DIR")
    args = parser.parse_args(argv)
    check_output_dir(args.hf_dir, overwrite=args.overwrite, inputs={"input model directory": args.model_dir})
    model = load_model(args.model_dir, hf=False)
    tokenizer = args.tokenizer or tokenizer_path(args.model_dir)
    kept = kept_files(args.model_dir)
    to_hf(model, args.hf_dir, tokenizer=tokenizer, chat_template=kept.get(CHAT_TEMPLATE_FILE),
          generation=kept.get(GENERATION_FILE))
    arch = "MistralForCausalLM" if model.cfg.sliding_window else "LlamaForCausalLM"
    print(f"{args.model_dir} -> {args.hf_dir} ({arch}{', with tokenizer' if tokenizer else ''})")
    return 0
