"""Attention options beyond the official checkpoints: per-head q/k RMSNorm (Qwen3) and RoPE scaling.

Oracles are transformers' own modules on the same weights: `Qwen3Attention` for ``attention_qk_norm``,
`LlamaRotaryEmbedding` / `LlamaAttention` for ``rope_scaling_params`` (linear, dynamic NTK, llama3).
Checkpoints with the options reload bit-exactly, through our class and through remote code.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiny_configs import tiny_config
from transformers import LlamaConfig, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM
from transformers_nemotron3.modeling.attention import Nemotron3Attention, rotary_cos_sin

ATTN = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}
MAX_POS = 64  # dynamic NTK changes the frequencies only beyond this length


def _ours(**kw) -> Nemotron3Attention:
    config = Nemotron3Config(**ATTN, hybrid_override_pattern="*", use_rope=True, rope_theta=10000.0,
                             max_position_embeddings=MAX_POS, layer_norm_epsilon=1e-6, **kw)
    config._attn_implementation = "eager"
    return Nemotron3Attention(config, 0).eval()


def _copy_weights(dst: Nemotron3Attention, src: torch.nn.Module) -> None:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=True)
    assert not missing and not unexpected


def _causal_additive(length: int) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]


def _randomize_norms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))


@torch.no_grad()
def test_qk_norm_attention_equals_qwen3():
    torch.manual_seed(0)
    qcfg = Qwen3Config(**ATTN, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       max_position_embeddings=MAX_POS)
    qcfg._attn_implementation = "eager"
    ref = Qwen3Attention(qcfg, layer_idx=0).eval()
    _randomize_norms(ref)
    ours = _ours(attention_qk_norm=True)
    assert {n for n, _ in ours.named_parameters()} >= {"q_norm.weight", "k_norm.weight"}
    _copy_weights(ours, ref)
    x = torch.randn(2, 11, 64)
    pos = torch.arange(11)[None].expand(2, -1)
    cos, sin = Qwen3RotaryEmbedding(qcfg)(x, pos)
    expected, _ = ref(x, (cos, sin), _causal_additive(11))
    for impl in ("eager", "sdpa"):
        ours.config._attn_implementation = impl
        assert (ours(x, position_ids=pos)[0] - expected).abs().max().item() < 1e-5, impl
    # the norms matter: without them the output is different (the check above could fail)
    ours.use_qk_norm = False
    assert (ours(x, position_ids=pos)[0] - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_scaled_rope_tables_equal_transformers(kind):
    params = {**SCALINGS[kind], "rope_theta": 10000.0}
    lcfg = LlamaConfig(**ATTN, max_position_embeddings=MAX_POS, rope_parameters=params)
    rope = LlamaRotaryEmbedding(lcfg)
    length = 3 * MAX_POS  # beyond max_position_embeddings, where dynamic NTK kicks in
    pos = torch.arange(length)[None]
    x = torch.randn(1, length, 64)
    cos_ref, sin_ref = rope(x, pos)
    cos, sin = rotary_cos_sin(pos, 16, 10000.0, torch.float32, SCALINGS[kind], MAX_POS)
    assert (cos - cos_ref).abs().max().item() < 1e-5 and (sin - sin_ref).abs().max().item() < 1e-5
    plain_cos, _ = rotary_cos_sin(pos, 16, 10000.0, torch.float32)
    assert (plain_cos - cos_ref).abs().max().item() > 1e-2  # the scaling is really applied


@torch.no_grad()
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_scaled_rope_attention_equals_llama(kind):
    torch.manual_seed(0)
    lcfg = LlamaConfig(**ATTN, max_position_embeddings=MAX_POS, rope_parameters={**SCALINGS[kind], "rope_theta": 1e4})
    lcfg._attn_implementation = "eager"
    ref = LlamaAttention(lcfg, layer_idx=0).eval()
    ours = _ours(rope_scaling_params=SCALINGS[kind])
    _copy_weights(ours, ref)
    length = MAX_POS + 16
    x = torch.randn(1, length, 64)
    pos = torch.arange(length)[None]
    cos, sin = LlamaRotaryEmbedding(lcfg)(x, pos)
    expected, _ = ref(x, (cos, sin), _causal_additive(length))
    assert (ours(x, position_ids=pos)[0] - expected).abs().max().item() < 1e-5


@torch.no_grad()
def test_decode_with_cache_equals_full_forward():
    torch.manual_seed(0)
    config = tiny_config("all_blocks", use_rope=True, attention_qk_norm=True, rope_scaling_params=SCALINGS["llama3"])
    model = Nemotron3ForCausalLM(config).eval()
    _randomize_norms(model)
    ids = torch.randint(3, 96, (2, 10))
    full = model(ids, logits_to_keep=0).logits
    out = model(ids[:, :7], use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values
    steps = []
    for t in range(7, 10):  # one token at a time on top of the cache
        steps.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
    assert (torch.stack(steps, 1) - full[:, 7:]).abs().max().item() < 1e-4


def test_config_options_validate_and_round_trip():
    cfg = tiny_config("all_blocks", use_rope=True, attention_qk_norm=True,
                      rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                                    "original_max_position_embeddings": 32})
    assert cfg.rope_scaling_params == {**SCALINGS["llama3"]}
    official = cfg.to_official_dict()
    assert official["attention_qk_norm"] is True and official["rope_scaling_params"] == SCALINGS["llama3"]
    again = Nemotron3Config(**{k: v for k, v in official.items() if k not in ("model_type", "architectures")})
    assert again.rope_scaling_params == cfg.rope_scaling_params and again.attention_qk_norm is True
    assert tiny_config().rope_scaling_params is None and tiny_config().attention_qk_norm is False
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        tiny_config(use_rope=True, rope_scaling_params={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="high_freq_factor"):
        tiny_config(use_rope=True, rope_scaling_params={"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(ValueError, match="`use_rope` is false"):
        tiny_config(rope_scaling_params={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown key"):
        tiny_config(use_rope=True, rope_scaling_params={"rope_type": "linear", "factor": 2.0, "beta_fast": 3})
    with pytest.raises(ValueError, match="low_freq_factor=4.0"):
        tiny_config(use_rope=True, rope_scaling_params={**SCALINGS["llama3"], "low_freq_factor": 4.0})
    with pytest.raises(ValueError, match="attention_qk_norm"):
        tiny_config(attention_qk_norm="yes")


REMOTE = """
import sys
sys.modules["transformers_nemotron3"] = None  # make the package unimportable
import torch
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
assert "transformers_modules" in type(model).__module__, type(model).__module__
with torch.no_grad():
    torch.save(model(torch.load(folder + "/x.pt")).logits, folder + "/remote_logits.pt")
"""


@torch.no_grad()
def test_checkpoint_with_options_reloads_bit_exactly(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("all_blocks", use_rope=True, attention_qk_norm=True, rope_scaling_params=SCALINGS["llama3"])
    model = Nemotron3ForCausalLM(config).eval()
    _randomize_norms(model)
    folder = tmp_path / "ck"
    model.save_pretrained(folder)
    loaded = Nemotron3ForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.rope_scaling_params == SCALINGS["llama3"] and loaded.config.attention_qk_norm
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and "model.layers.1.mixer.q_norm.weight" in sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randint(3, 96, (2, 9))
    assert torch.equal(model(x).logits, loaded(x).logits)
    torch.save(x, folder / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", REMOTE, str(folder)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(folder / "remote_logits.pt"), model(x).logits)
