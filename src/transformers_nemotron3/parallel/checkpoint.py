"""Full checkpoints from and into expert-sharded ranks, in the official on-disk layout.

- `gather_full_state_dict`: the model's state dict with every expert shard all-gathered over its ep
  group (dense tensors are replicated already); collective, so every rank calls it.
- `save_full_checkpoint`: gathers, then rank 0 calls the model's own ``save_pretrained`` with the full
  state dict (official keys, one tensor per expert, ``config.json`` with ``auto_map``); a barrier ends it.
- `load_full_checkpoint_into`: every rank reads the full checkpoint with the model's ``from_pretrained``
  and copies into its (possibly sharded) parameters, taking its own expert slice. Bit-exact both ways.

Unwrap any wrapper (`ContextParallelLM`, Accelerate) before calling; with FSDP2 ``data_parallel_mode
="shard"`` gather the dense DTensors first (``full_tensor()``), which this module does when it sees them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import is_expert_shard


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_full_state_dict(model: nn.Module, ep_group=None) -> dict[str, torch.Tensor]:
    """State dict of the unsharded model (collective over ``ep_group`` when experts are sharded)."""
    params = dict(model.named_parameters())
    state = {}
    for name, value in model.state_dict().items():
        value = _full(value.detach())
        p = params.get(name)
        if p is not None and is_expert_shard(p):
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(parts, value.contiguous(), group=ep_group)
            value = torch.cat(parts)
        state[name] = value.clone()
    return state


def save_full_checkpoint(model: nn.Module, save_directory, ep_group=None, **save_kwargs) -> None:
    """Write one full official-layout checkpoint from sharded ranks (rank 0 writes; all ranks call)."""
    state = gather_full_state_dict(model, ep_group)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        model.save_pretrained(save_directory, state_dict=state, **save_kwargs)
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def load_full_checkpoint_into(model: nn.Module, path) -> nn.Module:
    """Copy a full checkpoint into ``model`` in place; expert shards take their ``(rank, ep)`` slice."""
    full = type(model).from_pretrained(path, dtype=torch.float32)
    source = full.state_dict()
    params = dict(model.named_parameters())
    for name, target in model.state_dict().items():
        value = source[name]
        p = params.get(name)
        if p is not None and is_expert_shard(p):
            rank, ep = p._nemotron3_expert_shard
            local = value.shape[0] // ep
            value = value[rank * local:(rank + 1) * local]
        if value.shape != target.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                             f"{tuple(target.shape)}; was the model built from the same config?")
        value = value.to(target.dtype)
        if hasattr(target, "device_mesh"):  # FSDP2 DTensor: copy into this rank's shard
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value, target.device_mesh, target.placements)
        target.copy_(value)
    return model


__all__ = ["gather_full_state_dict", "save_full_checkpoint", "load_full_checkpoint_into"]
