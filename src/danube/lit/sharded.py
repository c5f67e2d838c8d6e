"""Fully sharded data parallel training (torch's FSDP2) under Lightning, with DDP's checkpoint format.

``trainer.strategy=fsdp`` shards every block's parameters, gradients and AdamW moments over
the ranks (:func:`danube.model.sharding.shard_model`, through Lightning's
``ModelParallelStrategy``). FSDP2 runs on gloo as on NCCL, so it is tested on CPU; Lightning's
``FSDPStrategy`` (FSDP1) refuses a CPU accelerator.

Checkpoints are gathered whole on rank zero and written in the layout DDP writes: weights
under ``state_dict``, the optimizer state with its parameters numbered and listed per
parameter group, as ``torch.optim.Optimizer.state_dict()`` has it. Loading one, Lightning's
``ModelParallelStrategy`` takes those numbers for positions in the module's parameter order,
which they are not under DDP: with danube's two AdamW groups (decayed weights, then the
norms) the moments would land on the wrong parameters. Here they are matched through the
parameter groups, as ``Optimizer.load_state_dict`` matches them, so a run moves between DDP
and FSDP (and between world sizes) at any checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy


def _is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def named_by_group(numbered_state: dict[str, Any], module: torch.nn.Module, optimizer) -> dict[str, Any]:
    """A saved ``Optimizer.state_dict()`` keyed by the names of ``module``'s parameters (what
    torch's ``set_optimizer_state_dict`` takes), for ``optimizer`` over those parameters.

    The saved groups are matched to the optimizer's groups position by position, as
    ``Optimizer.load_state_dict`` does; a checkpoint of another optimizer layout is refused.
    """
    name_of = {id(p): n for n, p in module.named_parameters()}
    saved, ours = numbered_state["param_groups"], optimizer.param_groups
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in ours]:
        raise ValueError(
            f"the checkpoint's optimizer has parameter groups of {[len(g['params']) for g in saved]} tensors, "
            f"this model's {[len(g['params']) for g in ours]}: it is not a checkpoint of this model"
        )
    name = {i: name_of[id(p)]
            for g_saved, g_ours in zip(saved, ours) for i, p in zip(g_saved["params"], g_ours["params"])}
    return {
        "state": {name[i]: s for i, s in numbered_state["state"].items()},
        "param_groups": [{**g_saved, "params": [name[i] for i in g_saved["params"]]} for g_saved in saved],
    }


def load_full_state(module: torch.nn.Module, optimizer, weights: dict, optim_state: dict) -> None:
    """A whole (gathered) checkpoint's weights and optimizer state into ``module`` and ``optimizer``.

    ``weights`` is keyed like ``module.state_dict()``; ``optim_state`` is a saved
    ``Optimizer.state_dict()``. Sharded parameters (DTensors) take their shard of
    each tensor, moments included; an unsharded module loads both as they are.
    """
    if not _is_sharded(module):
        module.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(module, weights, options=options)
    set_optimizer_state_dict(module, optimizer, named_by_group(optim_state, module, optimizer), options=options)


class ShardedDataParallel(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 (no tensor parallelism), loading checkpoints as DDP does."""

    def __init__(self, world_size: int, timeout) -> None:
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=False, timeout=timeout)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a whole checkpoint (``weights_only``, memory-mapped) and load every rank's shard of it."""
        from danube.checkpoints import load_checkpoint

        path = Path(self.broadcast(str(checkpoint_path)))
        checkpoint = load_checkpoint(path, mmap=True)
        weights = checkpoint.pop("state_dict")
        load_full_state(self.lightning_module, self.optimizers[0], weights, checkpoint["optimizer_states"][0])
        return checkpoint
