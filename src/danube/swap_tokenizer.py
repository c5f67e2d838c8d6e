"""Swap a model directory's tokenizer, keeping what the model learned about shared pieces.

H2O-Danube2 (report, section 7) moved from the Llama 2 to the Mistral tokenizer this way:
"we re-map the matching tokens and only randomly re-initialize the new tokens". For every
piece present in both vocabularies, its rows of ``embed_tokens`` and ``lm_head`` move to the
piece's id in the new tokenizer, bit for bit; pieces only the new tokenizer has get rows
drawn exactly as the model's own initialisation draws them (:meth:`Danube.init_weights`);
pieces only the old one had are dropped. Every other tensor is copied unchanged, and the
config changes only in ``vocab_size`` (the new tokenizer's piece count: the config
requires no rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from danube.data.tokenizer import Tokenizer
from danube.files import check_output_dir
from danube.model import DanubeConfig, build_model
from danube.model.io import check_model_dir, load_weights, read_config, save_model_dir, tokenizer_path
from danube.model.loading import load_model

log = logging.getLogger(__name__)

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class SwapResult:
    """What a swap did: piece counts and the vocabulary sizes before and after."""

    out_dir: Path
    shared: int  # pieces in both tokenizers: rows moved
    new: int  # pieces only in the new tokenizer: rows initialised
    dropped: int  # pieces only in the old tokenizer: rows removed
    old_vocab_size: int  # the model's, before (may exceed the old tokenizer's pieces)
    new_vocab_size: int


def fresh_vocab_rows(cfg: DanubeConfig, seed: int) -> dict[str, torch.Tensor]:
    """``embed_tokens`` (and ``lm_head`` unless tied) as the model's own init draws them for ``cfg``.

    The model is built on the meta device and only these two modules are given memory, so
    :meth:`Danube.init_weights` (the very code a fresh model runs) fills them without
    allocating the rest of a 1.8B model.
    """
    model = build_model(cfg, device="meta")
    model.model.embed_tokens.to_empty(device="cpu")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()  # meta tensors elsewhere: their init is a no-op
    rows = {EMBED: model.model.embed_tokens.weight.detach()}
    if not cfg.tie_word_embeddings:
        rows[HEAD] = model.lm_head.weight.detach()
    return rows


def swap_tokenizer(
    model_dir: str | Path, new_tokenizer: str | Path, out_dir: str | Path, *, seed: int = 0, overwrite: bool = False
) -> SwapResult:
    """Write ``out_dir``: ``model_dir``'s model re-mapped to ``new_tokenizer``'s vocabulary.

    Args:
        model_dir: A danube model directory with its ``tokenizer.model``.
        new_tokenizer: A SentencePiece ``.model`` file, or a directory holding ``tokenizer.model``.
        out_dir: Where the new model directory goes (written to a temporary sibling, then renamed).
        seed: Seed of the new pieces' initialisation.
        overwrite: Replace an existing ``out_dir`` (only once the new one is complete).

    Raises:
        FileNotFoundError: ``model_dir`` is not a model directory, has no tokenizer, or
            ``new_tokenizer`` does not exist.
        FileExistsError: ``out_dir`` is ``model_dir``, or exists and ``overwrite`` is false.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_model_dir(model_dir, hf=False)
    old_tok_path = tokenizer_path(model_dir)
    if old_tok_path is None:
        raise FileNotFoundError(
            f"{model_dir} has no tokenizer.model: the swap matches pieces of the old vocabulary to the new one, "
            "so it needs the tokenizer the model was trained with"
        )
    new_tok = Tokenizer(new_tokenizer)
    old_tok = Tokenizer(old_tok_path)
    check_output_dir(out_dir, overwrite=overwrite, inputs={"input model directory": model_dir, "new tokenizer": new_tok.model_file})
    cfg = read_config(model_dir)  # fails before the weights are read
    if old_tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{old_tok_path} has {old_tok.vocab_size} pieces but {model_dir}'s vocab_size is "
                         f"{cfg.vocab_size}: it is not the tokenizer this model was trained with")
    old_ids = {piece: i for i, piece in enumerate(old_tok.pieces())}
    new_pieces = new_tok.pieces()
    pairs = [(new_id, old_ids[p]) for new_id, p in enumerate(new_pieces) if p in old_ids]
    shared = len(pairs)
    dropped = len(old_ids) - shared

    model = load_model(model_dir, hf=False)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    new_cfg = DanubeConfig.from_dict({**cfg.to_dict(), "vocab_size": new_tok.vocab_size})
    fresh = fresh_vocab_rows(new_cfg, seed)
    new_idx = torch.tensor([n for n, _ in pairs], dtype=torch.long)
    old_idx = torch.tensor([o for _, o in pairs], dtype=torch.long)
    for name, rows in fresh.items():
        rows = rows.to(state[name].dtype)
        rows[new_idx] = state[name][old_idx]
        state[name] = rows
    if cfg.tie_word_embeddings:
        state.pop(HEAD, None)
    if cfg.vocab_size > old_tok.vocab_size:
        log.info("%d rows beyond the old tokenizer's %d pieces (padding) are dropped", cfg.vocab_size - old_tok.vocab_size,
                 old_tok.vocab_size)
    swapped = load_weights(build_model(new_cfg, device="meta"), state, f"{model_dir} re-mapped")
    save_model_dir(swapped, out_dir, tokenizer=new_tok.model_file)
    result = SwapResult(out_dir, shared, new_tok.vocab_size - shared, dropped, cfg.vocab_size, new_tok.vocab_size)
    log.info("swapped %s -> %s: %d shared, %d new, %d dropped pieces", model_dir, out_dir, shared, result.new, dropped)
    return result


def swap_tokenizer_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="danube swap-tokenizer",
        description="Re-map a model directory to another tokenizer: shared pieces keep their embedding and lm_head "
        "rows, new pieces are freshly initialised (as H2O-Danube2 moved from Llama 2's to Mistral's tokenizer).",
    )
    parser.add_argument("model_dir", help="danube model directory (with its tokenizer.model)")
    parser.add_argument("new_tokenizer", help="SentencePiece .model file (or a directory holding tokenizer.model)")
    parser.add_argument("out_dir", help="the new model directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new pieces' initialisation (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)
    r = swap_tokenizer(args.model_dir, args.new_tokenizer, args.out_dir, seed=args.seed, overwrite=args.overwrite)
    print(f"shared {r.shared:,} pieces (rows moved to their new ids), new {r.new:,} (initialised as the model's init), "
          f"dropped {r.dropped:,}; vocab_size {r.old_vocab_size:,} -> {r.new_vocab_size:,}; wrote {r.out_dir}")
    return 0
