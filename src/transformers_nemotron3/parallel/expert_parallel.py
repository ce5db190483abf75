"""Expert parallelism from outside the model: shard routed experts over the ep group, install the dispatcher.

For every `Nemotron3MoE` layer:

- ``experts.up_proj / down_proj / gate_proj`` [E, ...] are replaced by this rank's contiguous slice
  [E/ep, ...] (rank r owns global experts ``r*E/ep .. (r+1)*E/ep - 1``) and ``experts.num_experts`` is set
  to E/ep; the layer itself still routes over all E experts;
- ``moe.dispatcher`` becomes an `AllToAllDispatcher` on the ep group (also used with ep=1 when a
  capacity factor is set, for token dropping without EP);
- a forward hook on the router hands the routing weights to the dispatcher (needed by ``probs`` dropping).

Sharded parameters are tagged ``param._nemotron3_expert_shard = (ep_rank, ep_size)``; gradient reduction
and checkpoint gathering read the tag.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..modeling.moe import Nemotron3MoE
from .dispatcher import AllToAllDispatcher

EXPERT_PARAMS = ("up_proj", "down_proj", "gate_proj")


def moe_layers(model: nn.Module) -> list[Nemotron3MoE]:
    return [m for m in model.modules() if isinstance(m, Nemotron3MoE)]


def is_expert_shard(param: torch.Tensor) -> bool:
    return getattr(param, "_nemotron3_expert_shard", None) is not None


def _stash_weights(dispatcher: AllToAllDispatcher):
    def hook(module, args, output):
        dispatcher.pending_weights = output[2].detach()
    return hook


def apply_expert_parallel(model: nn.Module, ep_group=None, capacity_factor: float | None = None,
                          drop_policy: str = "probs", pad_to_capacity: bool = False) -> nn.Module:
    """Shard experts over ``ep_group`` (None = one process) and install all-to-all dispatchers, in place."""
    ep = dist.get_world_size(ep_group) if ep_group is not None else 1
    rank = dist.get_rank(ep_group) if ep_group is not None else 0
    layers = moe_layers(model)
    if ep > 1 and not layers:
        raise ValueError(f"expert parallelism (ep={ep}) needs MoE layers; this model has none.")
    for moe in layers:
        experts = moe.experts
        total = moe.num_experts
        if total % ep:
            raise ValueError(f"n_routed_experts={total} is not divisible by expert_parallel_size={ep}.")
        if experts.num_experts != total:
            raise ValueError("this MoE layer is already expert-parallel; apply_expert_parallel runs once.")
        local = total // ep
        if ep > 1:
            for name in EXPERT_PARAMS:
                full = getattr(experts, name)
                if full is None:
                    continue
                shard = nn.Parameter(full.detach()[rank * local:(rank + 1) * local].clone(),
                                     requires_grad=full.requires_grad)
                shard._nemotron3_expert_shard = (rank, ep)
                setattr(experts, name, shard)
            experts.num_experts = local
        dispatcher = AllToAllDispatcher(ep_group if ep > 1 else None, capacity_factor, drop_policy, pad_to_capacity)
        moe.dispatcher = dispatcher
        moe._nemotron3_ep_hook = moe.gate.register_forward_hook(_stash_weights(dispatcher))
    return model


def dispatch_bytes(model: nn.Module, reset: bool = True) -> int:
    """Forward-pass bytes this rank sent to other ep ranks since the last reset, over all MoE layers."""
    total = 0
    for moe in moe_layers(model):
        stats = getattr(moe.dispatcher, "stats", None)
        if stats is not None:
            total += stats["bytes_sent"]
            if reset:
                stats.update(bytes_sent=0, rows_sent=0)
    return total


__all__ = ["apply_expert_parallel", "moe_layers", "is_expert_shard", "dispatch_bytes", "EXPERT_PARAMS"]
