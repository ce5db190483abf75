"""Gradient reduction, norms and clipping for the folded layout.

Convention: the loss each rank back-propagates is chosen so that averaging gradients over all ranks
gives the gradient of the global mean loss (the CP loss helper multiplies its local part by cp for that).

- dense (replicated) parameters: DDP (or FSDP2) averages them; loops without either call
  `reduce_gradients`, which all-reduces SUM over the world and divides by the world;
- expert shards (DTensors on the expert mesh): each shard already collected the contributions of every
  rank of its ep group through the all-to-all backward; their own post-accumulate-grad hook all-reduces
  over edp (``DTensor.redistribute``) and divides by the world (see `expert_parallel.py`), so nothing
  here touches them.

Clipping is Accelerate's: ``accelerator.clip_grad_norm_`` groups gradients by device mesh (plain replicated
tensors, the expert mesh, FSDP2's mesh), takes ``torch.nn.utils.get_total_norm`` per mesh (``full_tensor()``
reduces a DTensor norm over its mesh) and clips with ``clip_grads_with_norm_``; transformers' Trainer does the
same for its own clipping. (``torch.nn.utils.clip_grad_norm_`` alone refuses lists that mix meshes.) Fused /
foreach optimizers need one parameter group per mesh for the same reason: `param_groups_by_mesh`
(the Trainer's ``create_optimizer`` splits its groups itself).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def reduce_gradients(model: nn.Module, world_size: int | None = None) -> None:
    """All-reduce the plain (replicated) ``.grad`` in place to the mean over the world (loops without DDP).
    DTensor gradients (expert shards, FSDP2) are reduced by their own hooks and left alone."""
    world = world_size or dist.get_world_size()
    if world == 1:
        return
    dense = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p.grad, DTensor)]
    if dense:
        flat = torch.cat([g.reshape(-1) for g in dense])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in dense:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def param_groups_by_mesh(params, **group_options) -> list[dict]:
    """Optimizer parameter groups with one device mesh each (plain tensors together): foreach / fused optimizer
    kernels cannot take DTensors of different meshes, or DTensors and plain tensors, in one call."""
    by_mesh = defaultdict(list)
    for p in params:
        by_mesh[p.device_mesh if isinstance(p, DTensor) else None].append(p)
    return [{"params": group, **group_options} for group in by_mesh.values()]


def mean_over_ranks(value: torch.Tensor, group=None) -> torch.Tensor:
    """Detached mean of a scalar over ``group`` (for logging)."""
    value = value.detach().clone().float()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)


__all__ = ["reduce_gradients", "param_groups_by_mesh", "mean_over_ranks"]
