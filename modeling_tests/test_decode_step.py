"""The lean one-token decode step (modeling/decode.py) against the layers' regular forward.

The regular path is itself tested against transformers' native NemotronH (test_model_parity.py);
here the fast step must give the same logits and leave the same cache behind, for every block
type, LatentMoE with group-limited routing, a gated-expert model, left-padded batches, bf16, and
it must step aside whenever one of its conditions does not hold.
"""

from __future__ import annotations

import pytest
import torch
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.modeling import decode as decode_module
from transformers_nemotron3.modeling import modeling_nemotron3 as modeling_module


def _model(name: str, dtype=torch.float32, **overrides) -> Nemotron3ForCausalLM:
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config(name, **overrides)).eval()
    for p in model.parameters():  # random everywhere (biases, norms and zero-init router included)
        p.data.normal_(0.0, 0.2 if p.dim() == 1 else 0.1)
    return model.to(dtype)


def _decode(model, ids, mask, steps: int, fast: bool, monkeypatch):
    """Prefill ``ids`` then greedy-decode ``steps`` tokens; returns (step logits, final cache)."""
    if not fast:
        monkeypatch.setattr(modeling_module, "can_decode_fast", lambda *a, **k: False)
    logits = []
    with torch.inference_mode():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(tok, attention_mask=mask, cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
    monkeypatch.undo()
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("name,overrides", [
    ("all_blocks", {}),
    ("latent_groups_mtp", {}),
    ("dense", {}),
    ("all_blocks", {"moe_gated_experts": True, "moe_expert_act": "silu", "attention_qk_norm": True}),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_equals_layer_forward(name, overrides, batch, monkeypatch):
    model = _model(name, **overrides)
    ids = torch.randint(3, 96, (batch, 11))
    mask = None
    if batch > 1:  # left padding: row 1 has 3 pads, row 2 has 5
        mask = torch.ones(batch, 11, dtype=torch.long)
        mask[1, :3] = 0
        mask[2, :5] = 0
    calls = []
    real = decode_module.decode_step
    monkeypatch.setattr(modeling_module, "decode_step", lambda *a: calls.append(1) or real(*a))
    fast, fast_cache = _decode(model, ids, mask, 6, True, monkeypatch)
    assert len(calls) == 6  # the fast step ran for every decode forward, and not for the prefill
    ref, ref_cache = _decode(model, ids, mask, 6, False, monkeypatch)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)
    for i, st in fast_cache.layers.items():
        other = ref_cache.layers[i]
        if hasattr(st, "ssm"):
            torch.testing.assert_close(st.conv, other.conv, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(st.ssm, other.ssm, atol=1e-5, rtol=1e-5)
        else:
            assert st.length == other.length
            torch.testing.assert_close(st.keys[:, :, : st.length], other.keys[:, :, : other.length])


def test_decode_step_bf16_matches_layer_forward(monkeypatch):
    model = _model("all_blocks", torch.bfloat16)
    ids = torch.randint(3, 96, (2, 9))
    fast, _ = _decode(model, ids, None, 4, True, monkeypatch)
    ref, _ = _decode(model, ids, None, 4, False, monkeypatch)
    assert fast.dtype == ref.dtype == torch.float32  # logits are returned in fp32 either way
    torch.testing.assert_close(fast, ref, atol=3e-2, rtol=3e-2)


class _LoraLike(torch.nn.Linear):
    """A linear with a low-rank delta, the way PEFT's LoRA wraps projections (forward differs from F.linear)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.3)
        self.lora_b = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.3)

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def test_decode_step_runs_wrapped_projections_and_hooks(monkeypatch):
    """LoRA-style linears and forward hooks on projections and norms act in the fast step as in the layers."""
    model = _model("all_blocks")
    for layer in model.backbone.layers:
        mixer = layer.mixer
        for name in ("in_proj", "out_proj", "q_proj", "v_proj", "o_proj"):
            if hasattr(mixer, name):
                setattr(mixer, name, _LoraLike(getattr(mixer, name)))
    hooked = model.backbone.layers[0].norm
    hooked.register_forward_hook(lambda mod, args, out: out * 1.5)
    ids = torch.randint(3, 96, (2, 9))
    calls = []
    real = decode_module.decode_step
    monkeypatch.setattr(modeling_module, "decode_step", lambda *a: calls.append(1) or real(*a))
    fast, _ = _decode(model, ids, None, 4, True, monkeypatch)
    assert len(calls) == 4
    ref, _ = _decode(model, ids, None, 4, False, monkeypatch)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)
    plain, _ = _decode(_model("all_blocks"), ids, None, 4, True, monkeypatch)
    assert not torch.allclose(fast, plain, atol=1e-3)  # the wrappers did change the result


def test_decode_step_steps_aside(monkeypatch):
    """Conditions the fast step does not handle go through the regular layers."""
    model = _model("all_blocks")
    ids = torch.randint(3, 96, (1, 7))
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        emb = model.backbone.embeddings(ids[:, -1:])
        ok = decode_module.can_decode_fast
        assert ok(model.backbone, emb, cache, None, None, False)
        assert not ok(model.backbone, model.backbone.embeddings(ids[:, :2]), cache, None, None, False)  # 2 tokens
        assert not ok(model.backbone, emb, None, None, None, False)  # no cache
        assert not ok(model.backbone, emb, cache, None, torch.zeros(1, 1, dtype=torch.long), False)  # packed
        assert not ok(model.backbone, emb, cache, None, None, True)  # hidden states requested
        cache.start_recording()  # speculative verification records per-token Mamba states
        assert not ok(model.backbone, emb, cache, None, None, False)
        cache.keep_first(None)
    with torch.no_grad(), torch.enable_grad():
        assert not ok(model.backbone, emb, cache, None, None, False)  # autograd on
    with torch.no_grad():
        assert ok(model.backbone, emb, cache, None, None, False)
        model.config.use_rope = True
        assert not ok(model.backbone, emb, cache, None, None, False)
        model.config.use_rope = False
        mixer = model.backbone.layers[0].mixer  # a plugin rebinding a mixer's forward keeps the regular path
        mixer.forward = mixer.forward
        assert not ok(model.backbone, emb, cache, None, None, False)
        del mixer.forward
        assert ok(model.backbone, emb, cache, None, None, False)
        model.config._attn_implementation = "flex_attention"
        assert not ok(model.backbone, emb, cache, None, None, False)
