"""Parallel training for Nemotron 3, applied from outside the single-device model through its seams.

- `Nemotron3ParallelConfig`: cp / ep sizes, token dropping; builds the folded meshes (dp x cp for the
  dense parts, edp x ep for the experts: MoE parallel folding).
- `prepare_nemotron3_parallel(model, config)` -> `Nemotron3Parallel`: EP, then CP, then DDP-ready model,
  plus batch sharding, gradient/loss reduction and full-checkpoint save/load for an Accelerate loop.
- Building blocks: `apply_expert_parallel`, `AllToAllDispatcher` (dropless or capacity dropping with
  'probs' / 'position' policies, optional padding to capacity), `apply_context_parallel` +
  `ContextParallelLM` (zig-zag split, attention K/V all-gather, head-parallel Mamba),
  `save_full_checkpoint` / `load_full_checkpoint_into` (official layout, for publishing),
  `save_sharded_checkpoint` / `load_sharded_checkpoint` (DCP, exact resume), `reduce_gradients`,
  `param_groups_by_mesh` (optimizer groups for foreach / fused kernels), `run_processes` (gloo CPU launcher).

See docs/parallelism.md.
"""

from .accelerate_plugin import Nemotron3Parallel, prepare_nemotron3_parallel
from .checkpoint import gather_full_state_dict, load_full_checkpoint_into, save_full_checkpoint
from .config import Nemotron3ParallelConfig
from .context_parallel import ContextParallelLM, apply_context_parallel, zigzag_positions
from .dispatcher import AllToAllDispatcher, capacity_keep_mask, expert_capacity
from .distributed_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from .expert_parallel import apply_expert_parallel, dispatch_bytes, is_expert_shard
from .gradients import mean_over_ranks, param_groups_by_mesh, reduce_gradients
from .spawn import run_processes

__all__ = [
    "Nemotron3ParallelConfig", "prepare_nemotron3_parallel", "Nemotron3Parallel",
    "apply_expert_parallel", "AllToAllDispatcher", "capacity_keep_mask", "expert_capacity", "dispatch_bytes",
    "is_expert_shard", "apply_context_parallel", "ContextParallelLM", "zigzag_positions",
    "save_full_checkpoint", "load_full_checkpoint_into", "gather_full_state_dict",
    "save_sharded_checkpoint", "load_sharded_checkpoint", "reduce_gradients", "param_groups_by_mesh",
    "mean_over_ranks", "run_processes",
]
