"""Gradient and loss reduction for the folded layout (replicated data parallel, no FSDP).

Convention: the loss each rank back-propagates is chosen so that averaging gradients over all ranks
gives the gradient of the global mean loss (the CP loss helper multiplies its local part by cp for that).

- dense (replicated) parameters: all-reduce SUM over the world, divide by world;
- expert shards: each shard already collected the contributions of every rank of its ep group
  through the all-to-all backward, so all-reduce SUM over its edp group only, then divide by world.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import is_expert_shard


def reduce_gradients(model: nn.Module, edp_group=None, world_size: int | None = None) -> None:
    """All-reduce ``.grad`` in place so every rank holds the gradient of the global mean loss."""
    world = world_size or dist.get_world_size()
    if world == 1:
        return
    dense = [p.grad for p in model.parameters() if p.grad is not None and not is_expert_shard(p)]
    expert = [p.grad for p in model.parameters() if p.grad is not None and is_expert_shard(p)]
    if dense:
        flat = torch.cat([g.reshape(-1) for g in dense])
        dist.all_reduce(flat)
        flat /= world

        offset = 0
        for g in dense:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    edp = dist.get_world_size(edp_group) if edp_group is not None else world
    for g in expert:
        if edp > 1:
            dist.all_reduce(g, group=edp_group)
        g /= world


def mean_over_ranks(value: torch.Tensor, group=None) -> torch.Tensor:
    """Detached mean of a scalar over ``group`` (for logging)."""
    value = value.detach().clone().float()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)


__all__ = ["reduce_gradients", "mean_over_ranks"]
