"""Perplexity of a model on validation token shards (litdata format, as `danube prepare` writes).

Shards are read as consecutive blocks of ``seq_len + 1`` token ids; each block is one
sequence of ``seq_len`` predictions, the same cut the training loader makes, so the
number is comparable with the ``val/loss`` logged during training (``exp(val/loss)``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from danube.model import Danube

log = logging.getLogger(__name__)


def find_shards(data_dir: str | Path) -> Path:
    """The folder holding litdata's ``index.json``: ``data_dir`` itself or its ``val`` split."""
    data_dir = Path(data_dir)
    for candidate in (data_dir, data_dir / "val"):
        if (candidate / "index.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{data_dir}: no litdata index.json here or in {data_dir / 'val'}; point data_dir at the validation "
        "shards written by `danube prepare`"
    )


@torch.no_grad()
def perplexity(
    model: Danube,
    data_dir: str | Path,
    seq_len: int,
    batch_size: int = 8,
    max_blocks: int | None = None,
) -> dict[str, float | int | str]:
    """Mean next-token cross-entropy over the shards and its exponential.

    Returns ``{"loss", "perplexity", "tokens", "blocks", "data_dir", "seq_len"}``.
    """
    from litdata import StreamingDataset, TokensLoader

    shards = find_shards(data_dir)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    dataset = StreamingDataset(str(shards), item_loader=TokensLoader(block_size=seq_len + 1), shuffle=False)
    n_blocks = len(dataset) if max_blocks is None else min(len(dataset), int(max_blocks))
    if n_blocks == 0:
        raise ValueError(f"{shards}: fewer than seq_len + 1 = {seq_len + 1} tokens, not one block to score")
    device = next(model.parameters()).device
    model.eval()
    total, count, start = 0.0, 0, time.perf_counter()
    for first in range(0, n_blocks, batch_size):
        batch = torch.stack([torch.as_tensor(dataset[i]) for i in range(first, min(first + batch_size, n_blocks))])
        batch = batch.long().to(device)  # (B, seq_len + 1)
        if int(batch.max()) >= model.cfg.vocab_size:
            raise ValueError(
                f"{shards}: token id {int(batch.max())} >= the model's vocab_size {model.cfg.vocab_size}; "
                "the shards were tokenized with another tokenizer"
            )
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    loss = total / count
    log.info("perplexity on %s: %.3f (loss %.4f, %d tokens, %.1fs)", shards, math.exp(loss), loss, count, time.perf_counter() - start)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "blocks": n_blocks, "data_dir": str(shards), "seq_len": seq_len}
