"""`Nemotron3ParallelConfig`: the sizes of each parallel dimension and the two folded DeviceMesh views.

MoE parallel folding (Liu et al. 2025, arXiv 2504.14960): the same ranks are laid out twice.

- dense view ``(dp, cp)``: attention, Mamba, MLP, norms, embeddings; ``cp`` is the fastest-varying dim,
  so ``rank = dp_rank * cp + cp_rank``;
- expert view ``(edp, ep)``: the routed experts; ``ep`` is fastest, ``rank = edp_rank * ep + ep_rank``.

Because both views count ranks from the fastest dim, an ep group covers the cp neighbours first (the
"fold": CP=2 x EP=2 on 4 ranks puts cp and ep on the same pairs {0,1}, {2,3}), and ``edp`` is derived as
``world / ep``. Nothing here communicates except `build_meshes`, which creates the process groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

DROP_POLICIES = ("probs", "position")
DP_MODES = ("replicate", "shard")


@dataclass
class Nemotron3ParallelConfig:
    """Sizes and MoE token-dropping options; `validate` says exactly which value is wrong.

    Args:
        context_parallel_size: ranks that share one sequence (zig-zag chunks, rank i holds chunks i and 2cp-1-i).
        expert_parallel_size: ranks over which the routed experts of every MoE layer are split.
        data_parallel_mode: ``"replicate"`` (DDP / all-reduced gradients) or ``"shard"`` (FSDP2 ``fully_shard``
            of every block and the root over all ranks, expert shards ignored by FSDP and kept EP-sharded).
        capacity_factor: ``None`` = dropless; otherwise each expert takes at most
            ``ceil(local_tokens * top_k / num_experts * capacity_factor)`` token copies per rank
            (sub-sequence dropping, the Megatron default).
        drop_policy: ``"probs"`` keeps the copies with the highest routing weight, ``"position"`` the earliest.
        pad_to_capacity: every expert computes exactly ``capacity`` rows per source rank (static shapes).
        world_size: defaults to ``torch.distributed.get_world_size()``.
    """

    context_parallel_size: int = 1
    expert_parallel_size: int = 1
    data_parallel_mode: str = "replicate"
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    world_size: int | None = None

    # ------------------------------------------------------------------ derived sizes
    @property
    def world(self) -> int:
        if self.world_size is not None:
            return self.world_size
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def cp(self) -> int:
        return self.context_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_parallel_size

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense view: ``world / cp``."""
        return self.world // self.cp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: ``world / ep`` (replicas of each expert shard)."""
        return self.world // self.ep

    # ------------------------------------------------------------------ validation
    def validate(self, model_config=None) -> "Nemotron3ParallelConfig":
        """Raise `ValueError` naming the bad value; with a model config also check the model divides."""
        world = self.world
        for name in ("context_parallel_size", "expert_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if world % self.cp:
            raise ValueError(f"context_parallel_size={self.cp} does not divide the world size {world}; "
                             f"pick a divisor of {world}.")
        if world % self.ep:
            raise ValueError(f"expert_parallel_size={self.ep} does not divide the world size {world}; "
                             f"pick a divisor of {world}.")
        if self.data_parallel_mode not in DP_MODES:
            raise ValueError(f"data_parallel_mode={self.data_parallel_mode!r}; use one of {DP_MODES}.")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={self.drop_policy!r}; use one of {DROP_POLICIES}.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor!r} must be > 0, or None for dropless routing.")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("pad_to_capacity=True needs a capacity_factor (dropless routing has no capacity).")
        if model_config is not None:
            self._validate_model(model_config)
        return self

    def _validate_model(self, c) -> None:
        kinds = set(c.layers_block_type)
        if self.ep > 1:
            if "moe" not in kinds:
                raise ValueError(f"expert_parallel_size={self.ep} but the model has no MoE (`E`) layers; use 1.")
            if c.n_routed_experts % self.ep:
                raise ValueError(f"n_routed_experts={c.n_routed_experts} is not divisible by "
                                 f"expert_parallel_size={self.ep}.")
        if self.cp > 1:
            if "linear_attention" in kinds:
                if c.mamba_num_heads % self.cp:
                    raise ValueError(f"mamba_num_heads={c.mamba_num_heads} is not divisible by "
                                     f"context_parallel_size={self.cp} (Mamba CP splits heads over cp ranks).")
                if c.n_groups % self.cp:
                    raise ValueError(f"n_groups={c.n_groups} is not divisible by context_parallel_size={self.cp} "
                                     "(Mamba CP splits B/C groups over cp ranks).")
            rope = getattr(c, "rope_scaling_params", None) or {}
            if getattr(c, "use_rope", False) and rope.get("rope_type") == "dynamic":
                raise ValueError("context parallelism with dynamic RoPE scaling would scale by each rank's local "
                                 "positions; use 'linear' / 'llama3' scaling or context_parallel_size=1.")
            if getattr(c, "num_nextn_predict_layers", 0) and getattr(c, "mtp_loss_scale", 0) > 0:
                raise ValueError("context parallelism does not support the MTP training loss yet; "
                                 "set mtp_loss_scale=0 or context_parallel_size=1.")

    # ------------------------------------------------------------------ meshes
    def build_meshes(self, device_type: str = "cpu"):
        """Create the two folded `DeviceMesh` views over all ranks: ``(dense, expert)``.

        dense has dims ``("dp", "cp")``, expert has dims ``("edp", "ep")``. Must run on every rank.
        """
        from torch.distributed.device_mesh import init_device_mesh

        self.validate()
        dense = init_device_mesh(device_type, (self.dp, self.cp), mesh_dim_names=("dp", "cp"))
        expert = init_device_mesh(device_type, (self.edp, self.ep), mesh_dim_names=("edp", "ep"))
        return dense, expert


__all__ = ["Nemotron3ParallelConfig", "DROP_POLICIES", "DP_MODES"]
