"""Nemotron3Config reads the official config.json files and rejects invalid values with clear errors."""

from __future__ import annotations

import json

import pytest

from transformers_nemotron3 import Nemotron3Config

NANO = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", "num_hidden_layers": 52,
    "hidden_size": 2688, "vocab_size": 131072, "tie_word_embeddings": False, "max_position_embeddings": 262144,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "attention_bias": False,
    "rope_theta": 10000, "partial_rotary_factor": 1.0, "sliding_window": None, "mamba_num_heads": 64,
    "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4, "chunk_size": 128, "expand": 2,
    "mamba_hidden_act": "silu", "mamba_proj_bias": False, "use_bias": False, "use_conv_bias": True,
    "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 0.0001, "time_step_limit": [0.0, float("inf")],
    "n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 1, "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "intermediate_size": 1856, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "mlp_hidden_act": "relu2", "mlp_bias": False,
    "layer_norm_epsilon": 1e-05, "norm_eps": 1e-05, "residual_in_fp32": False, "rescale_prenorm_residual": True,
    "initializer_range": 0.02, "hidden_dropout": 0.0, "use_mamba_kernels": True, "use_cache": True,
    "num_logits_to_keep": 1, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
    "mamba_ssm_cache_dtype": "float32", "transformers_version": "4.55.4",
    "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                 "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"},
}
SUPER = {
    **NANO,
    "hybrid_override_pattern": "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME",
    "num_hidden_layers": 88, "hidden_size": 4096, "mamba_num_heads": 128, "n_routed_experts": 512,
    "num_experts_per_tok": 22, "moe_intermediate_size": 2688, "moe_shared_expert_intermediate_size": 5376,
    "moe_latent_size": 1024, "moe_shared_expert_overlap": False, "routed_scaling_factor": 5.0,
    "num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E", "intermediate_size": 2688,
    "eos_token_id": [2, 11],
}
NANO_9B_V2 = {
    "model_type": "nemotron_h", "hybrid_override_pattern": "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
    "num_hidden_layers": 56, "hidden_size": 4480, "intermediate_size": 15680, "num_attention_heads": 40,
    "num_key_value_heads": 8, "head_dim": 128, "mamba_num_heads": 128, "mamba_head_dim": 80, "ssm_state_size": 128,
    "n_groups": 8, "conv_kernel": 4, "vocab_size": 131072, "max_position_embeddings": 131072, "pad_token_id": 12,
}


def load(d: dict) -> Nemotron3Config:
    return Nemotron3Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures", "auto_map")})


def test_nano_config():
    c = load(NANO)
    assert c.num_hidden_layers == 52
    assert c.layers_block_type.count("linear_attention") == 23 and c.layers_block_type.count("moe") == 23
    assert [i for i, b in enumerate(c.layers_block_type) if b == "full_attention"] == [5, 12, 19, 26, 33, 42]
    assert c.mamba_intermediate_size == 4096 and c.mamba_conv_dim == 6144
    assert c.time_step_limit == (0.0, float("inf"))
    assert c.moe_latent_size is None and c.num_nextn_predict_layers == 0


def test_super_config_latent_and_mtp():
    c = load(SUPER)
    assert c.num_hidden_layers == 88 and c.moe_latent_size == 1024
    assert c.mtp_layers_block_type == ["full_attention", "moe"] and c.num_nextn_predict_layers == 1
    assert c.eos_token_id == [2, 11]


def test_dense_nemotron_h_config():
    c = load(NANO_9B_V2)
    assert c.layers_block_type.count("mlp") == 25 and "moe" not in c.layers_block_type
    assert c.mamba_conv_dim == 128 * 80 + 2 * 8 * 128


def test_legacy_mamba_spellings_and_list_form():
    c = Nemotron3Config(layers_block_type=["linear_attention", "full_attention", "moe", "mlp"], mamba_n_groups=4,
                        mamba_d_conv=3, mamba_chunk_size=32, mamba_dt_limit=(0.001, 10.0), mamba_conv_bias=False,
                        mamba_num_heads=8)
    assert c.hybrid_override_pattern == "M*E-"
    assert (c.n_groups, c.conv_kernel, c.chunk_size, c.use_conv_bias) == (4, 3, 32, False)
    assert c.time_step_limit == (0.001, 10.0)
    c2 = Nemotron3Config(layers_block_type=["mamba", "attention", "moe"], mamba_num_heads=8)
    assert c2.hybrid_override_pattern == "M*E"


def test_official_dict_round_trip():
    c = load(SUPER)
    d = json.loads(json.dumps(c.to_official_dict()))  # through JSON, as on disk (Infinity included)
    assert d["model_type"] == "nemotron_h" and d["hybrid_override_pattern"] == SUPER["hybrid_override_pattern"]
    assert d["mtp_hybrid_override_pattern"] == "*E"
    c2 = load(d)
    assert c2.layers_block_type == c.layers_block_type and c2.moe_latent_size == 1024
    assert c2.time_step_limit == c.time_step_limit


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"hybrid_override_pattern": "MEX*"}, "hybrid_override_pattern"),
        ({"hybrid_override_pattern": "ME*", "num_hidden_layers": 4}, "num_hidden_layers"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads"),
        ({"mamba_num_heads": 6, "n_groups": 4}, "n_groups"),
        ({"num_experts_per_tok": 9, "n_routed_experts": 8}, "num_experts_per_tok"),
        ({"n_group": 3, "n_routed_experts": 8}, "n_group"),
        ({"n_group": 2, "topk_group": 3}, "topk_group"),
        ({"moe_router_score_function": "relu"}, "moe_router_score_function"),
        ({"time_step_limit": (0.5, 0.1)}, "time_step_limit"),
        ({"mlp_hidden_act": "swish"}, "mlp_hidden_act"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"hybrid_override_pattern": None, "layers_block_type": ["mamba", "transformer"]}, "layers_block_type"),
        ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
        ({"mamba_ssm_cache_dtype": "int8"}, "mamba_ssm_cache_dtype"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    base = dict(hybrid_override_pattern="M*E", mamba_num_heads=8, n_routed_experts=8)
    with pytest.raises(ValueError, match=key):
        Nemotron3Config(**{**base, **overrides})
