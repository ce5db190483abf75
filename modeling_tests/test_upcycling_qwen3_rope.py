"""Upcycling Qwen3 (per-head q/k RMSNorm) and Llama 3.1-style sources (scaled RoPE): fp32 step-0 logits
equal the dense model's, in memory and through the streaming writer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.upcycling import UpcyclingConfig, upcycle, upcycle_to_disk

TOL = 1e-4
DIMS = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=32, initializer_range=0.1)
SCALED = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
}
SETTINGS = {"E8G1T2": dict(num_experts=8, granularity=1, top_k=2),
            "E8G4T4": dict(num_experts=8, granularity=4, top_k=4)}


def _ids(length: int = 12) -> torch.Tensor:
    return torch.randint(3, 96, (2, length), generator=torch.Generator().manual_seed(1))


def _randomize_norms(model: torch.nn.Module) -> None:
    """Non-trivial norm weights, so that a norm mapped to the wrong place (or dropped) shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))


@torch.no_grad()
def _max_diff(dense, moe, length: int = 12) -> float:
    ids = _ids(length)
    return (moe(ids, logits_to_keep=0).logits - dense(ids).logits).abs().max().item()


@pytest.fixture(scope="module")
def qwen3():
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**DIMS, rms_norm_eps=1e-6,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    _randomize_norms(model)
    return model.eval()


def _llama(kind: str):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DIMS, rope_parameters=SCALED[kind]))
    _randomize_norms(model)
    return model.eval()


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_qwen3_exact(qwen3, setting):
    moe = upcycle(qwen3, UpcyclingConfig(**SETTINGS[setting]))
    assert moe.config.attention_qk_norm and moe.config.hybrid_override_pattern == "*E*E"
    assert torch.equal(moe.state_dict()["model.layers.2.mixer.k_norm.weight"],
                       qwen3.state_dict()["model.layers.1.self_attn.k_norm.weight"])
    assert _max_diff(qwen3, moe) <= TOL


def test_qwen3_oracle_is_sensitive(qwen3):
    """Dropping the q/k norms makes the upcycled model clearly different: the check above can fail."""
    moe = upcycle(qwen3, UpcyclingConfig(**SETTINGS["E8G1T2"]))
    for layer in moe.backbone.layers:
        if layer.block_type == "full_attention":
            layer.mixer.use_qk_norm = False
    assert _max_diff(qwen3, moe) > 1e-2


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("kind", sorted(SCALED))
def test_scaled_rope_llama_exact(kind, setting):
    dense = _llama(kind)
    moe = upcycle(dense, UpcyclingConfig(**SETTINGS[setting]))
    expected = {k: v for k, v in SCALED[kind].items() if k != "rope_theta"}
    assert moe.config.rope_scaling_params == expected and not moe.config.attention_qk_norm
    # 3x max_position_embeddings: beyond it dynamic NTK changes the frequencies, llama3 bands all matter
    assert _max_diff(dense, moe, length=3 * DIMS["max_position_embeddings"]) <= TOL


@pytest.mark.parametrize("kind", sorted(SCALED))
def test_scaled_rope_oracle_is_sensitive(kind):
    dense = _llama(kind)
    moe = upcycle(dense, UpcyclingConfig(**SETTINGS["E8G1T2"]))
    moe.config.rope_scaling_params = None  # plain RoPE: the frequencies the source does not use
    assert _max_diff(dense, moe, length=3 * DIMS["max_position_embeddings"]) > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("source", ["qwen3", "llama3"])
def test_streaming_from_directory_equals_online(source, qwen3, tmp_path):
    dense = qwen3 if source == "qwen3" else _llama("llama3")
    dense.save_pretrained(tmp_path / "dense")
    cfg = UpcyclingConfig(**SETTINGS["E8G4T4"])
    upcycle_to_disk(tmp_path / "dense", tmp_path / "moe", cfg, progress=False)
    offline = Nemotron3ForCausalLM.from_pretrained(tmp_path / "moe").eval()
    online = upcycle(tmp_path / "dense", cfg)
    assert offline.config.attention_qk_norm == (source == "qwen3")
    assert offline.config.rope_scaling_params == online.config.rope_scaling_params
    sa, sb = online.state_dict(), offline.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = _ids(40)
    assert torch.equal(online(ids).logits, offline(ids).logits)
    assert _max_diff(dense, offline, length=40) <= TOL


def test_unsupported_rope_scaling_is_refused():
    torch.manual_seed(0)
    yarn = LlamaForCausalLM(LlamaConfig(**DIMS, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16}))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        upcycle(yarn)
