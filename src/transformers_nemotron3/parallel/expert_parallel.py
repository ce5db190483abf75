"""Expert parallelism from outside the model: routed experts become DTensors sharded over the ep mesh dim.

For every `Nemotron3MoE` layer (torchtitan's ``ExpertParallel`` style, on our seams):

- ``experts.up_proj / down_proj / gate_proj`` [E, ...] become ``DTensor`` parameters on the expert mesh
  ``(edp, ep)`` with placements ``(Replicate(), Shard(0))``: rank r of an ep group holds global experts
  ``r*E/ep .. (r+1)*E/ep - 1`` (``to_local()`` [E/ep, ...]); ``experts.num_experts`` is set to E/ep, the
  layer still routes over all E;
- ``experts.gemm`` is wrapped by `LocalShardGemm`, which hands the wrapped grouped GEMM the local shard
  (``to_local(grad_placements=(Partial(), Shard(0)))``: the gradient that comes back is labelled partial over
  edp, which it is: every edp replica saw other tokens);
- a ``load_state_dict`` pre-hook cuts full expert tensors to the local shard, so a full state dict loads as is;
- ``moe.dispatcher`` becomes an `AllToAllDispatcher` on the ep group (also used with ep=1 when a capacity
  factor is set, for token dropping without EP). The layer passes it the routing weights.

Gradients: a post-accumulate-grad hook on each expert parameter (installed by `LocalShardGemm`) turns the partial gradient into the
replicated one (``DTensor.redistribute``: an all-reduce over edp) and divides by the world size, the same
mean as DDP applies to the dense parameters. It runs when Accelerate says gradients sync
(``GradientState.sync_gradients``: the last micro-batch of an accumulation, always in a plain loop), so
gradient accumulation reduces once. (With ``fsdp=True``, ``data_parallel_mode="shard"``, the shards are instead
``Shard(0)`` on the ep sub-mesh and FSDP2 units over edp, which reduce them; see `LocalShardGemm`.) Norms, clipping, optimizer state and checkpoints then come from torch's
DTensor support (``get_total_norm`` per mesh, ``torch.distributed.checkpoint``), nothing here tags tensors.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from ..modeling.moe import Nemotron3MoE
from .dispatcher import AllToAllDispatcher

EXPERT_PARAMS = ("up_proj", "down_proj", "gate_proj")


def moe_layers(model: nn.Module) -> list[Nemotron3MoE]:
    return [m for m in model.modules() if isinstance(m, Nemotron3MoE)]


def is_expert_shard(param: torch.Tensor) -> bool:
    """Whether ``param`` is an expert-parallel shard: a DTensor on a mesh with an ``ep`` dimension."""
    return isinstance(param, DTensor) and "ep" in (param.device_mesh.mesh_dim_names or ())


def _placements(grad: bool = False) -> tuple:
    """(Replicate over edp, Shard(0) over ep); for the gradient of the local compute: Partial over edp."""
    return (Partial() if grad else Replicate()), Shard(0)


def _sync_gradients() -> bool:
    try:
        from accelerate.state import GradientState
    except ImportError:  # pragma: no cover - accelerate is a dependency of the parallel extra
        return True
    return GradientState().sync_gradients


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (see `LocalShardGemm`, FSDP2 experts)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class LocalShardGemm:
    """Wraps an experts ``gemm(x, weight, counts)`` seam: DTensor weights are handed over as the local shard.

    It also makes sure the expert parameter in use carries the gradient-reduction hook (`_reduce_expert_grad`):
    registered here, at the first forward of each parameter object, because moving a module (``model.to(device)``
    as Trainer / Accelerate do) may replace a DTensor parameter by a new object without the hooks of the old one.

    With ``fsdp=True`` (``data_parallel_mode="shard"``) the weights are FSDP2-managed DTensors on the 1-D ep mesh:
    FSDP2 unshards them over edp before the forward and reduce-scatters their gradients with a mean over edp; the
    local gradient is scaled by ``1/ep`` so that the result is the mean over the world, as for every other
    parameter (the all-to-all backward already summed the ep ranks' contributions). No hook then.
    """

    def __init__(self, inner, fsdp: bool = False, ep: int = 1) -> None:
        self.inner = inner
        self.fsdp, self.ep = fsdp, ep
        self._hooked: dict[int, weakref.ref] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if isinstance(weight, DTensor) and self.fsdp:
            weight = _ScaleGrad.apply(weight.to_local(), 1.0 / self.ep)
        elif isinstance(weight, DTensor):
            self._ensure_hook(weight)
            weight = weight.to_local(grad_placements=_placements(grad=True))
        return self.inner(x, weight, counts)

    def _ensure_hook(self, param: torch.Tensor) -> None:
        ref = self._hooked.get(id(param))
        if param.requires_grad and (ref is None or ref() is not param):
            param.register_post_accumulate_grad_hook(_reduce_expert_grad)
            self._hooked[id(param)] = weakref.ref(param)


def _reduce_expert_grad(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: partial over edp -> replicated (all-reduce via DTensor), then / world."""
    grad = param.grad
    if grad is None or not _sync_gradients() or not any(p.is_partial() for p in grad.placements):
        return
    grad = grad.redistribute(grad.device_mesh, _placements())
    param.grad = grad / dist.get_world_size()


def _shard_full_expert_tensors(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook of expert-parallel experts: a full (plain) tensor for a DTensor parameter is cut
    to this rank's shard (``distribute_tensor(..., src_data_rank=None)``: no communication), so loading a full state
    dict (Trainer's resume, ``load_state_dict`` of a one-process checkpoint) works on the sharded model."""
    for name in EXPERT_PARAMS:
        param, key = getattr(module, name, None), prefix + name
        value = state_dict.get(key)
        if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            if value.shape != param.shape:
                raise ValueError(f"{key}: full tensor of shape {tuple(value.shape)} for an expert shard of global shape "
                                 f"{tuple(param.shape)}; was the checkpoint written from the same config?")
            state_dict[key] = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements,
                                                src_data_rank=None)


def apply_expert_parallel(model: nn.Module, expert_mesh: DeviceMesh | None = None, capacity_factor: float | None = None,
                          drop_policy: str = "probs", pad_to_capacity: bool = False, fsdp: bool = False) -> nn.Module:
    """Shard experts over ``expert_mesh`` (the ``(edp, ep)`` mesh of `Nemotron3ParallelConfig.build_meshes`; None =
    one process) and install all-to-all dispatchers, in place. ``fsdp=True``: the experts are also FSDP2
    ``fully_shard``-ed over the edp dim (torchtitan's EP + FSDP), which then reduces their gradients."""
    if expert_mesh is not None and not isinstance(expert_mesh, DeviceMesh):
        raise ValueError(f"expert_mesh must be a DeviceMesh with dims ('edp', 'ep'), got {type(expert_mesh).__name__}; "
                         "use the expert mesh of Nemotron3ParallelConfig.build_meshes().")
    if expert_mesh is not None and tuple(expert_mesh.mesh_dim_names or ()) != ("edp", "ep"):
        raise ValueError(f"expert_mesh has dims {expert_mesh.mesh_dim_names}; it must be ('edp', 'ep') (edp may be 1), "
                         "as built by Nemotron3ParallelConfig.build_meshes().")
    ep_mesh = expert_mesh["ep"] if expert_mesh is not None else None
    ep = ep_mesh.size() if ep_mesh is not None else 1
    layers = moe_layers(model)
    if ep > 1 and not layers:
        raise ValueError(f"expert parallelism (ep={ep}) needs MoE layers; this model has none.")
    for moe in layers:
        experts = moe.experts
        total = moe.num_experts
        if total % ep:
            raise ValueError(f"n_routed_experts={total} is not divisible by expert_parallel_size={ep}.")
        if experts.num_experts != total or isinstance(experts.gemm, LocalShardGemm):
            raise ValueError("this MoE layer is already expert-parallel; apply_expert_parallel runs once.")
        if ep > 1:
            for name in EXPERT_PARAMS:
                full = getattr(experts, name)
                if full is None:
                    continue
                # every rank holds the same full tensor: take the local slice, no communication
                mesh, placements = (ep_mesh, (Shard(0),)) if fsdp else (expert_mesh, _placements())
                shard = distribute_tensor(full.detach(), mesh, placements, src_data_rank=None)
                setattr(experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
            experts.num_experts = total // ep
            experts.gemm = LocalShardGemm(experts.gemm, fsdp, ep)
            experts.register_load_state_dict_pre_hook(_shard_full_expert_tensors)
            if fsdp:
                from torch.distributed.fsdp import fully_shard

                fully_shard(experts, mesh=expert_mesh["edp"])
        moe.dispatcher = AllToAllDispatcher(ep_mesh.get_group() if ep > 1 else None, capacity_factor, drop_policy,
                                            pad_to_capacity)
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


__all__ = ["apply_expert_parallel", "moe_layers", "is_expert_shard", "dispatch_bytes", "EXPERT_PARAMS",
           "LocalShardGemm"]
