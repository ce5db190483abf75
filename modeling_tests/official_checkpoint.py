"""Write a tiny checkpoint by hand in the official Nemotron 3 on-disk format.

Independent of the package's model code: keys and shapes come from the reference notes
(`backbone.*`, one tensor per expert, `mtp.*`, untied `lm_head`, `model_type: nemotron_h`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def official_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 tensors under the official key names for a config dict with official keys."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh, P, G, N, K = cfg["mamba_num_heads"], cfg["mamba_head_dim"], cfg["n_groups"], cfg["ssm_state_size"], cfg["conv_kernel"]
    I_m = nh * P
    conv_dim = I_m + 2 * G * N
    qh, kvh, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, I_e, I_s = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["moe_shared_expert_intermediate_size"]
    lat = cfg.get("moe_latent_size")
    t: dict[str, torch.Tensor] = {"backbone.embeddings.weight": rnd(V, H, scale=1.0),
                                  "backbone.norm_f.weight": 1 + rnd(H), "lm_head.weight": rnd(V, H)}

    def attention(prefix):
        t[f"{prefix}.mixer.q_proj.weight"] = rnd(qh * hd, H)
        t[f"{prefix}.mixer.k_proj.weight"] = rnd(kvh * hd, H)
        t[f"{prefix}.mixer.v_proj.weight"] = rnd(kvh * hd, H)
        t[f"{prefix}.mixer.o_proj.weight"] = rnd(H, qh * hd)

    def moe(prefix):
        w = lat or H
        t[f"{prefix}.mixer.gate.weight"] = rnd(E, H)
        t[f"{prefix}.mixer.gate.e_score_correction_bias"] = rnd(E, scale=0.01)
        for j in range(E):
            t[f"{prefix}.mixer.experts.{j}.up_proj.weight"] = rnd(I_e, w)
            t[f"{prefix}.mixer.experts.{j}.down_proj.weight"] = rnd(w, I_e)
        t[f"{prefix}.mixer.shared_experts.up_proj.weight"] = rnd(I_s, H)
        t[f"{prefix}.mixer.shared_experts.down_proj.weight"] = rnd(H, I_s)
        if lat:
            t[f"{prefix}.mixer.fc1_latent_proj.weight"] = rnd(lat, H)
            t[f"{prefix}.mixer.fc2_latent_proj.weight"] = rnd(H, lat)

    for i, c in enumerate(cfg["hybrid_override_pattern"]):
        p = f"backbone.layers.{i}"
        t[f"{p}.norm.weight"] = 1 + rnd(H)
        if c == "M":
            t[f"{p}.mixer.in_proj.weight"] = rnd(I_m + conv_dim + nh, H)
            t[f"{p}.mixer.conv1d.weight"] = rnd(conv_dim, 1, K, scale=0.3)
            t[f"{p}.mixer.conv1d.bias"] = rnd(conv_dim)
            t[f"{p}.mixer.A_log"] = torch.log(torch.arange(1, nh + 1, dtype=torch.float32)) + rnd(nh)
            t[f"{p}.mixer.D"] = 1 + rnd(nh)
            t[f"{p}.mixer.dt_bias"] = rnd(nh, scale=0.5)
            t[f"{p}.mixer.norm.weight"] = 1 + rnd(I_m)
            t[f"{p}.mixer.out_proj.weight"] = rnd(H, I_m)
        elif c == "*":
            attention(p)
        elif c == "E":
            moe(p)
        elif c == "-":
            t[f"{p}.mixer.up_proj.weight"] = rnd(cfg["intermediate_size"], H)
            t[f"{p}.mixer.down_proj.weight"] = rnd(H, cfg["intermediate_size"])
    if cfg.get("num_nextn_predict_layers", 0):
        pattern = cfg["mtp_hybrid_override_pattern"]
        for j, c in enumerate(pattern):
            p = f"mtp.layers.{j}"
            t[f"{p}.norm.weight"] = 1 + rnd(H)
            if j == 0:
                t[f"{p}.enorm.weight"] = 1 + rnd(H)
                t[f"{p}.hnorm.weight"] = 1 + rnd(H)
                t[f"{p}.eh_proj.weight"] = rnd(H, 2 * H)
            if j == len(pattern) - 1:
                t[f"{p}.final_layernorm.weight"] = 1 + rnd(H)
            attention(p) if c == "*" else moe(p)
    return t


def write_official_checkpoint(folder: Path, cfg: dict, shards: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write config.json + sharded safetensors with an index; return the tensors written."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = official_tensors(cfg, seed)
    keys = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "torch_dtype": "float32",
              "num_hidden_layers": len(cfg["hybrid_override_pattern"]), **cfg}
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


# A Nano-shaped tiny config written with the official JSON keys (and Super's MTP / LatentMoE keys).
TINY_OFFICIAL = {
    "vocab_size": 80, "hidden_size": 32, "hybrid_override_pattern": "MEM*E-", "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 8, "mamba_head_dim": 4, "n_groups": 2,
    "ssm_state_size": 8, "conv_kernel": 4, "chunk_size": 4, "expand": 2, "time_step_limit": [0.0, float("inf")],
    "n_routed_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 24, "intermediate_size": 20, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "mlp_hidden_act": "relu2", "layer_norm_epsilon": 1e-5,
    "use_conv_bias": True, "mamba_proj_bias": False, "use_bias": False, "mlp_bias": False, "attention_bias": False,
    "moe_latent_size": 12, "num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
