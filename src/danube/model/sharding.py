"""Fully sharded data parallelism (torch's FSDP2, ``fully_shard``) over a danube model."""

from __future__ import annotations

import logging

from danube.model.transformer import Danube

log = logging.getLogger(__name__)


def shard_model(model: Danube, mesh) -> Danube:
    """Shard ``model`` in place over the 1-D device ``mesh``: one unit per block, then the rest at the root.

    Each block's parameters are gathered for its forward and backward and freed after
    (``reshard_after_forward``), gradients are reduce-scattered; the root unit holds the
    embeddings, the final norm and ``lm_head``. Parameter names do not change, so checkpoints
    and model directories are those of an unsharded model.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    whole = sum(p.numel() for p in model.parameters())
    here = sum(p.to_local().numel() for p in model.parameters())
    if mesh.get_rank() == 0:
        log.info("FSDP2: %d units over %d ranks; this rank holds %s of %s parameters", len(model.model.layers) + 1,
                 mesh.size(), f"{here:,}", f"{whole:,}")
    return model
