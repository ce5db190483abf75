"""One call that makes a built Nemotron 3 model parallel before ``accelerator.prepare``.

Accelerate has no expert-parallel axis and its context parallelism only shards SDPA (no Mamba), and it
has no plugin registry, so the model is converted first and then handed to ``accelerator.prepare``::

    accelerator = Accelerator()                       # initialises the process group (gloo / nccl)
    par = prepare_nemotron3_parallel(model, Nemotron3ParallelConfig(context_parallel_size=2,
                                                                    expert_parallel_size=2))
    optimizer = torch.optim.AdamW(param_groups_by_mesh(par.model.parameters()))  # one group per mesh
    model, optimizer = accelerator.prepare(par.model, optimizer)   # DDP for the dense parameters
    for global_batch in loader:                       # every rank reads the same global batch
        out = model(**par.shard_batch(global_batch))
        accelerator.backward(out.loss)                # expert grads reduce over edp in their own hooks
        accelerator.clip_grad_norm_(model.parameters(), 1.0)   # DTensor-aware: global norm over both meshes
        optimizer.step(); optimizer.zero_grad()
        par.sync_expert_load(); par.base.update_expert_bias()
        par.save_sharded("ckpt/step-N", optimizer, step=N)   # DCP; par.load_sharded(...) resumes exactly

Order applied: (1) expert parallelism (experts become ``Shard(0)`` DTensors over the ep mesh dim, all-to-all
dispatchers), (2) context parallelism (attention kernel / Mamba ``sequence_mixer`` swapped, model wrapped in
`ContextParallelLM`), (3) data parallel: with ``data_parallel_mode="replicate"`` the expert DTensors are put on
DDP's ignore list and the dense parameters are left to Accelerate's DDP, which averages over all ranks;
without DDP call `reduce_gradients()`. With ``"shard"`` every block and the root are FSDP2 ``fully_shard``-ed
over all ranks with the expert DTensors ignored; then prepare only the optimizer with Accelerate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import load_full_checkpoint_into, save_full_checkpoint
from .config import Nemotron3ParallelConfig
from .context_parallel import ContextParallelLM, apply_context_parallel
from .distributed_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from .expert_parallel import apply_expert_parallel, dispatch_bytes, is_expert_shard, moe_layers
from .gradients import mean_over_ranks, reduce_gradients


@dataclass
class Nemotron3Parallel:
    """What `prepare_nemotron3_parallel` returns: the model to hand to Accelerate plus the loop helpers."""

    model: nn.Module  # the module to train (a `ContextParallelLM` when cp > 1)
    base: nn.Module  # the `Nemotron3ForCausalLM` inside it
    config: Nemotron3ParallelConfig
    dense_mesh: object
    expert_mesh: object
    groups: dict = field(default_factory=dict)

    @property
    def dp_rank(self) -> int:
        return self.dense_mesh.get_coordinate()[0]

    def shard_batch(self, batch: dict) -> dict:
        """Keep this rank's data-parallel slice of a global batch (dim 0 split over dp; cp ranks share it,
        `ContextParallelLM` then takes the zig-zag slice of the sequence). ``labels`` default to ``input_ids``."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape[0] % self.config.dp:
                    raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows; it must be a multiple of the "
                                     f"data-parallel size {self.config.dp}.")
                per = value.shape[0] // self.config.dp
                value = value[self.dp_rank * per:(self.dp_rank + 1) * per]
            out[key] = value
        out.setdefault("labels", out["input_ids"])
        return out

    def reduce_gradients(self) -> None:
        """Dense gradients, for loops that do not wrap the model in DDP (no-op with FSDP2, which reduces its own).
        Expert shards reduce themselves (post-accumulate-grad hooks, see `expert_parallel.py`)."""
        if self.config.data_parallel_mode != "shard":
            reduce_gradients(self.base)

    def mean_loss(self, loss: torch.Tensor) -> float:
        """The global mean loss for logging (mean over dp; cp ranks already hold the sequence loss)."""
        return float(mean_over_ranks(loss))

    def sync_expert_load(self) -> None:
        """Sum router token counts over all ranks so ``update_expert_bias`` acts on global loads."""
        for moe in moe_layers(self.base):
            if moe.gate.expert_load is not None:
                dist.all_reduce(moe.gate.expert_load)

    def dispatch_bytes(self, reset: bool = True) -> int:
        return dispatch_bytes(self.base, reset)

    def save_checkpoint(self, path, **save_kwargs) -> None:
        """Full official-layout checkpoint for publishing (gathered; rank 0 writes; collective)."""
        save_full_checkpoint(self.base, path, **save_kwargs)

    def load_checkpoint(self, path) -> None:
        """Weights from a full official-layout checkpoint into the shards."""
        load_full_checkpoint_into(self.base, path)

    def save_sharded(self, path, optimizer=None, step: int | None = None, **stateful) -> None:
        """DCP training checkpoint (model, optimizer, router biases and loads, RNG, step); collective."""
        save_sharded_checkpoint(path, self.base, _unwrap_optimizer(optimizer), step, **stateful)

    def load_sharded(self, path, optimizer=None, **stateful) -> int | None:
        """Resume from `save_sharded` in place; returns the saved step. Call with gradients cleared."""
        return load_sharded_checkpoint(path, self.base, _unwrap_optimizer(optimizer), **stateful)


def _unwrap_optimizer(optimizer):
    """Accelerate's ``AcceleratedOptimizer`` -> the torch optimizer (DCP reads its param groups)."""
    return getattr(optimizer, "optimizer", optimizer)


def prepare_nemotron3_parallel(model: nn.Module, config: Nemotron3ParallelConfig,
                               device_type: str | None = None) -> Nemotron3Parallel:
    """Apply EP, then CP, then mark expert shards for DDP; needs an initialised process group."""
    if not dist.is_initialized():
        raise ValueError("prepare_nemotron3_parallel needs torch.distributed initialised: create the "
                         "`Accelerator()` (or call init_process_group) first.")
    config.validate(model.config)
    if device_type is None:
        device_type = next(model.parameters()).device.type
    dense, expert = config.build_meshes(device_type)
    groups = {"dp": dense["dp"].get_group(), "cp": dense["cp"].get_group(),
              "edp": expert["edp"].get_group(), "ep": expert["ep"].get_group()}
    if config.ep > 1 or config.capacity_factor is not None:
        apply_expert_parallel(model, expert if config.ep > 1 else None, config.capacity_factor,
                              config.drop_policy, config.pad_to_capacity, fsdp=config.data_parallel_mode == "shard")
    wrapped = model
    if config.cp > 1:
        wrapped = ContextParallelLM(model, apply_context_parallel(model, groups["cp"]),
                                    pad_token_id=model.config.pad_token_id or 0)
    if config.data_parallel_mode == "shard":
        _fully_shard_dense(model, device_type)
    else:
        prefix = "model." if wrapped is not model else ""
        ignore = [prefix + n for n, p in model.named_parameters() if is_expert_shard(p)]
        if ignore:  # read by torch DDP: these parameters are neither broadcast nor all-reduced by DDP
            wrapped._ddp_params_and_buffers_to_ignore = ignore
    return Nemotron3Parallel(wrapped, model, config, dense, expert, groups)


def _fully_shard_dense(model: nn.Module, device_type: str) -> None:
    """FSDP2: shard every block and then the root over all ranks (dp x cp flattened). The experts are already
    their own FSDP2 units over the edp dim of the expert mesh (`apply_expert_parallel(fsdp=True)`), so the blocks'
    units skip their parameters.

    FSDP2 reduce-scatters with a mean over all ranks, the same convention as DDP, so the CP loss scaling
    stays as it is. Do not pass the model to ``accelerator.prepare`` afterwards (Accelerate would wrap it in DDP);
    prepare only the optimizer.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..modeling.blocks import Nemotron3Block

    mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp_cp",))
    for block in [m for m in model.modules() if isinstance(m, Nemotron3Block)]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


__all__ = ["prepare_nemotron3_parallel", "Nemotron3Parallel"]
