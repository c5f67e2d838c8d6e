"""Write litdata token shards the way `danube prepare` does (TokensLoader format)."""

from pathlib import Path

import torch


def _emit(path):
    yield torch.load(path)


def write_shards(tokens: torch.Tensor, out_dir: Path) -> Path:
    from litdata import TokensLoader, optimize

    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir.parent / f".{out_dir.name}.tokens.pt"
    torch.save(tokens.to(torch.int32), src)
    optimize(fn=_emit, inputs=[str(src)], output_dir=str(out_dir), chunk_size=64, item_loader=TokensLoader(),
             num_workers=1, verbose=False, start_method="fork")
    return out_dir
