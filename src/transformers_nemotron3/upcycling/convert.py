"""Dense -> Nemotron 3 MoE conversion: the target config, the per-layer tensor stream, and `upcycle`.

`iter_upcycled` yields the upcycled tensors (our internal names) one dense layer at a time; the
in-memory `upcycle` collects them into a model, the streaming writer (`stream.py`) writes them to
disk as they come. Both call the same code with the same per-layer random generators, so their
results are identical bit for bit.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..modeling.checkpoint_layout import official_to_internal
from ..modeling import Nemotron3Config, Nemotron3ForCausalLM
from ..modeling.configuration_nemotron3 import ACTIVATIONS, ROPE_SCALING_KEYS, parse_block_types
from .config import UpcyclingConfig
from .experts import router_scaling, router_weight, shared_expert, virtual_group_experts
from .sources import DenseSource

_DROP_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "num_hidden_layers",
              "hybrid_override_pattern", "layers_block_type", "layer_types", "torch_dtype")


def _dtype_name(c: dict[str, Any]) -> str | None:
    d = c.get("dtype") or c.get("torch_dtype")
    return str(d).replace("torch.", "") if d is not None else None


def _moe_fields(cfg: UpcyclingConfig, inter: int) -> dict[str, Any]:
    if inter % cfg.granularity:
        raise ValueError(
            f"granularity={cfg.granularity} does not divide the dense FFN width intermediate_size={inter}; "
            f"pick G among the divisors of {inter}."
        )
    return dict(
        n_routed_experts=cfg.num_routed_experts, num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=inter // cfg.granularity,
        n_shared_experts=1 if cfg.shared_expert else 0,
        moe_shared_expert_intermediate_size=inter if cfg.shared_expert else 0,
        moe_router_score_function=cfg.router, norm_topk_prob=cfg.normalized,
        routed_scaling_factor=router_scaling(cfg), moe_aux_loss_coef=cfg.aux_loss_coef,
        n_group=1, topk_group=1, moe_latent_size=None,
    )


# ---------------------------------------------------------------------------------------- Llama family
def _rope_scaling(rope: dict[str, Any], max_pos: int, where: str) -> dict[str, Any] | None:
    """The source's RoPE scaling as ``Nemotron3Config.rope_scaling_params`` (None for plain RoPE)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"{where}: rope_type={rope_type!r} (RoPE scaling) is not implemented by Nemotron 3 attention; supported: "
            f"'default', {', '.join(repr(k) for k in ROPE_SCALING_KEYS)}."
        )
    out = {"rope_type": rope_type}
    for key in ROPE_SCALING_KEYS[rope_type]:
        value = rope.get(key, max_pos if key == "original_max_position_embeddings" else None)
        if value is None:
            raise ValueError(f"{where}: rope_type={rope_type!r} without {key!r} in its RoPE parameters.")
        out[key] = value
    return out


def _llama_config(source: DenseSource, cfg: UpcyclingConfig) -> Nemotron3Config:
    c = source.config
    where = source.origin
    if cfg.moe_layers != "all":
        raise ValueError(
            f"moe_layers={cfg.moe_layers!r}: a Llama-family source needs moe_layers='all', because Nemotron 3 has no "
            "gated dense MLP block to keep the other layers exactly; convert every MLP layer."
        )
    act = c.get("hidden_act", "silu")
    if act not in ACTIVATIONS or act == "relu2":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported for gated experts; use silu, gelu or relu.")
    if c.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=True, but Nemotron 3 experts have no biases; cannot upcycle exactly.")
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) or 1.0
    max_pos = c.get("max_position_embeddings", 4096)
    scaling = _rope_scaling(rope, max_pos, where)
    sliding = [t for t in (c.get("layer_types") or []) if t != "full_attention"]
    window = c.get("sliding_window")
    uses_window = c.get("use_sliding_window", c.get("model_type") == "mistral")
    if sliding or (uses_window and window is not None and window < max_pos):
        raise ValueError(
            f"{where}: sliding-window attention (sliding_window={window}) has no counterpart in Nemotron 3 attention; "
            "only full-attention sources map exactly (e.g. set sliding_window=None if the model never used it)."
        )
    layers = int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    qkv_bias = source.has("model.layers.0.self_attn.q_proj.bias")
    return Nemotron3Config(
        vocab_size=int(c["vocab_size"]), hidden_size=hidden, hybrid_override_pattern="*E" * layers,
        num_attention_heads=heads, num_key_value_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or hidden // heads), max_position_embeddings=max_pos,
        attention_bias=qkv_bias, attention_dropout=float(c.get("attention_dropout", 0.0)),
        intermediate_size=int(c["intermediate_size"]), layer_norm_epsilon=float(c.get("rms_norm_eps", 1e-6)),
        use_rope=True, rope_theta=float(theta), partial_rotary_factor=float(partial), rope_scaling_params=scaling,
        attention_qk_norm=source.has("model.layers.0.self_attn.q_norm.weight"),
        moe_gated_experts=True, moe_expert_act=act, tie_word_embeddings=False,
        pad_token_id=c.get("pad_token_id"), bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
        dtype=_dtype_name(c), **_moe_fields(cfg, int(c["intermediate_size"])),
    )


def _llama_layers(source: DenseSource, cfg: UpcyclingConfig, target: Nemotron3Config) -> Iterator[dict]:
    act = target.moe_expert_act
    for i in range(target.num_hidden_layers // 2):
        src, a, m = f"model.layers.{i}.", f"backbone.layers.{2 * i}.", f"backbone.layers.{2 * i + 1}."
        out = {a + "norm.weight": source.get(src + "input_layernorm.weight")}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[a + f"mixer.{proj}.weight"] = source.get(src + f"self_attn.{proj}.weight")
            if target.attention_bias:
                key = src + f"self_attn.{proj}.bias"
                out[a + f"mixer.{proj}.bias"] = (
                    source.get(key) if source.has(key) else torch.zeros(target.hidden_size if proj == "o_proj" else
                                                                        out[a + f"mixer.{proj}.weight"].shape[0],
                                                                        dtype=out[a + f"mixer.{proj}.weight"].dtype)
                )
        if target.attention_qk_norm:  # Qwen3: per-head RMSNorm of q and k before RoPE
            out[a + "mixer.q_norm.weight"] = source.get(src + "self_attn.q_norm.weight")
            out[a + "mixer.k_norm.weight"] = source.get(src + "self_attn.k_norm.weight")
        out[m + "norm.weight"] = source.get(src + "post_attention_layernorm.weight")
        up, down, gate = (source.get(src + f"mlp.{p}.weight") for p in ("up_proj", "down_proj", "gate_proj"))
        out.update(_moe_tensors(cfg, 2 * i + 1, m, up, down, gate, act, target.hidden_size))
        yield out


# ---------------------------------------------------------------------------------------- Nemotron-H dense
def _nemotron_h_config(source: DenseSource, cfg: UpcyclingConfig) -> tuple[Nemotron3Config, list[int]]:
    c = dict(source.config)
    pattern = c.get("hybrid_override_pattern") or c.get("layers_block_type") or c.get("layer_types")
    blocks = parse_block_types(pattern, "hybrid_override_pattern")
    if "moe" in blocks:
        raise ValueError(f"{source.origin}: the source already has MoE ('E') layers; upcycle a dense Nemotron-H.")
    if c.get("num_nextn_predict_layers"):
        raise ValueError(f"{source.origin}: sources with an MTP head are not supported; drop the MTP head first.")
    if c.get("mlp_bias"):
        raise ValueError(f"{source.origin}: mlp_bias=True, but Nemotron 3 experts have no biases.")
    mlp_layers = [i for i, b in enumerate(blocks) if b == "mlp"]
    if isinstance(cfg.moe_layers, list) and cfg.moe_layers[-1] >= len(mlp_layers):
        raise ValueError(
            f"moe_layers={cfg.moe_layers} names MLP layer {cfg.moe_layers[-1]}, but the source has only "
            f"{len(mlp_layers)} dense MLP ('-') layers (indices 0..{len(mlp_layers) - 1})."
        )
    chosen = [layer for n, layer in enumerate(mlp_layers) if cfg.is_moe_layer(n)]
    if not chosen:
        raise ValueError(f"moe_layers={cfg.moe_layers!r} selects none of the {len(mlp_layers)} dense MLP ('-') layers.")
    new = ["moe" if i in chosen else b for i, b in enumerate(blocks)]
    raw = {k: v for k, v in c.items() if k not in _DROP_KEYS}
    raw.update(_moe_fields(cfg, int(c["intermediate_size"])))
    raw.update(layers_block_type=new, moe_gated_experts=False, dtype=_dtype_name(c), num_nextn_predict_layers=0)
    return Nemotron3Config(**raw), chosen


def _nemotron_h_layers(source: DenseSource, cfg: UpcyclingConfig, target: Nemotron3Config, chosen: list[int]
                       ) -> Iterator[dict]:
    by_layer: dict[int, dict[str, str]] = {}
    for key in source.keys():
        internal = _official_key(key)
        if internal.startswith("backbone.layers."):
            by_layer.setdefault(int(internal.split(".")[2]), {})[internal] = key
    for i in range(target.num_hidden_layers):
        keys = by_layer.get(i, {})
        p = f"backbone.layers.{i}."
        if i not in chosen:
            yield {internal: source.get(key) for internal, key in keys.items()}
            continue
        out = {p + "norm.weight": source.get(keys[p + "norm.weight"])}
        up = source.get(keys[p + "mixer.up_proj.weight"])
        down = source.get(keys[p + "mixer.down_proj.weight"])
        out.update(_moe_tensors(cfg, i, p, up, down, None, target.mlp_hidden_act, target.hidden_size))
        yield out


def _official_key(key: str) -> str:
    """A Nemotron-H checkpoint key (official, transformers' ``model.*`` or old ``embedding``) in the official
    ``backbone.*`` spelling the upcycler yields (the model's load_state_dict hook maps it to ``model.*``)."""
    if key.startswith("model."):
        key = "backbone." + key[len("model."):]
    return "backbone.embeddings.weight" if key == "backbone.embedding.weight" else key


# ---------------------------------------------------------------------------------------- shared pieces
def _moe_tensors(cfg: UpcyclingConfig, layer: int, prefix: str, up, down, gate, act: str, hidden: int) -> dict:
    out = {
        prefix + "mixer.gate.weight": router_weight(cfg, hidden, layer),
        prefix + "mixer.gate.e_score_correction_bias": torch.zeros(cfg.num_routed_experts, dtype=torch.float32),
    }
    for name, w in virtual_group_experts(cfg, layer, up, down, gate, act).items():
        out[prefix + f"mixer.experts.{name}"] = w
    if cfg.shared_expert:
        for name, w in shared_expert(cfg, up, down, gate).items():
            out[prefix + f"mixer.shared_experts.{name}"] = w
    return out


def build_target_config(source: DenseSource, cfg: UpcyclingConfig) -> Nemotron3Config:
    """The Nemotron 3 config of the upcycled model (validates the source against ``cfg``)."""
    if source.family == "llama":
        return _llama_config(source, cfg)
    return _nemotron_h_config(source, cfg)[0]


def iter_upcycled(source: DenseSource, cfg: UpcyclingConfig, target: Nemotron3Config) -> Iterator[dict[str, torch.Tensor]]:
    """Upcycled tensors (internal names, experts as 3-D tensors): embeddings, then one dict per dense layer,
    then the final norm and the LM head."""
    if source.family == "llama":
        yield {"backbone.embeddings.weight": source.get("model.embed_tokens.weight")}
        yield from _llama_layers(source, cfg, target)
        head = "lm_head.weight" if source.has("lm_head.weight") else "model.embed_tokens.weight"
        yield {"backbone.norm_f.weight": source.get("model.norm.weight"), "lm_head.weight": source.get(head)}
        return
    chosen = _nemotron_h_config(source, cfg)[1]
    emb = ("backbone.embeddings.weight", "model.embeddings.weight", "backbone.embedding.weight")
    yield {"backbone.embeddings.weight": source.first(*emb)}
    yield from _nemotron_h_layers(source, cfg, target, chosen)
    head = ("lm_head.weight",) + emb
    yield {"backbone.norm_f.weight": source.first("backbone.norm_f.weight", "model.norm_f.weight"),
           "lm_head.weight": source.first(*head)}


def upcycle(dense_model_or_path: Any, config: UpcyclingConfig | None = None, *,
            attn_implementation: str = "sdpa", **overrides: Any) -> Nemotron3ForCausalLM:
    """Upcycle a dense model (object or safetensors directory) into a `Nemotron3ForCausalLM`, in memory.

    Args:
        dense_model_or_path: a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM /
            NemotronHForCausalLM /
            dense Nemotron3ForCausalLM object, or a directory with its config.json and safetensors.
        config: the `UpcyclingConfig`; or pass its fields as keyword ``overrides`` (``num_experts=8, top_k=2``).
        attn_implementation: attention kernel of the returned model (``"sdpa"`` or ``"eager"``).

    Returns:
        The MoE model in eval mode, with the source's dtype (router in fp32). The source is not modified.
    """
    if config is None:
        config = UpcyclingConfig(**overrides)
    elif overrides:
        raise ValueError(f"Pass either an UpcyclingConfig or keyword fields, not both (got {sorted(overrides)}).")
    config.validate()
    source = DenseSource.open(dense_model_or_path)
    target = build_target_config(source, config)
    state: dict[str, torch.Tensor] = {}
    for part in iter_upcycled(source, config, target):
        state.update(part)
    state = official_to_internal(state)
    target._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = Nemotron3ForCausalLM(target)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return model


__all__ = ["upcycle", "build_target_config", "iter_upcycled"]
