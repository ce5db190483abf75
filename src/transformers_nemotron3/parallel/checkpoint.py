"""Full checkpoints from and into sharded ranks, in the official on-disk layout (for publishing).

Sharded training checkpoints (model + optimizer + router state, exact resume) are `distributed_checkpoint.py`;
this module is the one-file-set layout that ``from_pretrained`` reads in one process.

- `gather_full_state_dict`: the model's state dict with every DTensor (expert shards on the ep mesh, FSDP2
  shards of the dense part) gathered by ``full_tensor()``; collective, so every rank calls it.
- `save_full_checkpoint`: gathers, then rank 0 calls the model's own ``save_pretrained`` with the full
  state dict (official keys, one tensor per expert, ``config.json`` with ``auto_map``); a barrier ends it.
- `load_full_checkpoint_into`: every rank reads the full checkpoint with the model's ``from_pretrained``
  and copies into its (possibly sharded) parameters: ``distribute_tensor(..., src_data_rank=None)`` takes
  this rank's slice of a DTensor without communication. Bit-exact both ways.

Unwrap any wrapper (`ContextParallelLM`, DDP) before calling.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unsharded model (collective when any tensor is a DTensor)."""
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
            for name, value in model.state_dict().items()}


def save_full_checkpoint(model: nn.Module, save_directory, **save_kwargs) -> None:
    """Write one full official-layout checkpoint from sharded ranks (rank 0 writes; all ranks call)."""
    state = gather_full_state_dict(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        model.save_pretrained(save_directory, state_dict=state, **save_kwargs)
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def load_full_checkpoint_into(model: nn.Module, path) -> nn.Module:
    """Copy a full checkpoint into ``model`` in place; DTensors take this rank's slice."""
    full = type(model).from_pretrained(path, dtype=torch.float32)
    source = full.state_dict()
    for name, target in model.state_dict().items():
        value = source[name]
        if value.shape != target.shape:  # a DTensor's shape is the global one
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                             f"{tuple(target.shape)}; was the model built from the same config?")
        value = value.to(target.dtype)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(value)
    return model


__all__ = ["gather_full_state_dict", "save_full_checkpoint", "load_full_checkpoint_into"]
