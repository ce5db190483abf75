"""Tiny named configs shared by all tests: one place, few experts, every block type."""

from __future__ import annotations

import torch

from transformers_nemotron3 import Nemotron3Config

BASE = dict(
    vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=8,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    intermediate_size=40, routed_scaling_factor=2.5, initializer_range=0.05, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)

TINY = {
    # every block type, Nano-style MoE
    "all_blocks": dict(hybrid_override_pattern="M*E-ME"),
    # Super-style: LatentMoE, group-limited routing, MTP head
    "latent_groups_mtp": dict(hybrid_override_pattern="ME*E", moe_latent_size=24, n_group=4, topk_group=2,
                              num_experts_per_tok=3, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
                              routed_scaling_factor=5.0),
    # dense Nemotron-H (Nano-9B-v2 style)
    "dense": dict(hybrid_override_pattern="M-M*-M-"),
}


def tiny_config(name: str = "all_blocks", **overrides) -> Nemotron3Config:
    """A tiny `Nemotron3Config` by name, with optional overrides."""
    return Nemotron3Config(**{**BASE, **TINY[name], **overrides})


def native_config(config: Nemotron3Config):
    """The same architecture as transformers' native `NemotronHConfig`."""
    from transformers import NemotronHConfig

    d = config.to_official_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "dtype", "_name_or_path",
                "num_nextn_predict_layers", "mtp_hybrid_override_pattern"):
        d.pop(key, None)
    ours_only = ("use_rope", "moe_gated_experts", "moe_expert_act", "moe_router_score_function", "moe_aux_loss_coef",
                 "moe_bias_update_rate", "mtp_loss_scale", "mtp_num_depths", "time_step_limit")
    for key in ours_only:
        d.pop(key, None)
    known = set(NemotronHConfig.__dataclass_fields__) if hasattr(NemotronHConfig, "__dataclass_fields__") else None
    if known is not None:
        d = {k: v for k, v in d.items() if k in known or k in ("hybrid_override_pattern", "num_hidden_layers")}
    return NemotronHConfig(**d)


def randomize(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Overwrite every parameter with seeded N(0, std^2) values (tiny models with non-trivial outputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
