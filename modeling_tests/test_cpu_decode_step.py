"""The fused decode step: with the CPU kernels on, a cached decode step of a model whose blocks the kernels
cover runs as one ``nemotron3_cpu.decode_step`` call (embedding lookup, every block, final norm, LM head).

Checked against the module path with the kernels off (fp32: logits within 1e-4 and greedy tokens equal;
bf16: logits within bf16 tolerance), that nothing but that one op runs per step, and that the cache stays
right where its tensors move: key/value growth past the preallocated capacity, deep-copied caches, beam
search reordering, MTP drafting. Padded batches and uncovered blocks keep the module path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_configs import randomize, tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3 import cpu_kernels


def _model(name: str, dtype: torch.dtype = torch.float32, **overrides) -> Nemotron3ForCausalLM:
    torch.manual_seed(21)
    model = Nemotron3ForCausalLM(tiny_config(name, **overrides)).eval()
    randomize(model, std=0.08, seed=22)
    return model.to(dtype)


def _decode(model, ids: torch.Tensor, prompt: int, on: bool, spy=None, **kw) -> tuple[torch.Tensor, list]:
    """Teacher-forced cached decoding of ``ids[:, prompt:]`` after a prefill: (logits [b, steps, V], calls per step)."""
    cpu_kernels.enable_cpu_kernels(model, on)
    with torch.inference_mode():
        cache = model(ids[:, :prompt], use_cache=True).past_key_values
        logits, calls = [], []
        for t in range(prompt, ids.shape[1]):
            if spy is not None:
                spy.calls.clear()
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True, **kw)
            logits.append(out.logits[:, -1])
            calls.append(list(spy.calls) if spy is not None else [])
    return torch.stack(logits, 1), calls


@pytest.mark.parametrize("name", ["all_blocks", "dense", "latent_groups_mtp"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_is_one_call_and_equals_module_path(kernels, name, batch):
    model = _model(name)
    ids = torch.randint(3, 96, (batch, 16))
    on, calls = _decode(model, ids, 10, True, kernels)
    off, _ = _decode(model, ids, 10, False)
    assert calls[0] == ["decode_step"] and all(c == [] for c in calls[1:])  # plan built once, then only the op
    torch.testing.assert_close(on, off, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp"])
def test_bf16_decode_step_equals_module_path(kernels, name):
    model = _model(name, torch.bfloat16)
    ids = torch.randint(3, 96, (2, 14))
    on, calls = _decode(model, ids, 10, True, kernels)
    off, _ = _decode(model, ids, 10, False)
    assert calls[0] == ["decode_step"]
    torch.testing.assert_close(on, off, atol=3e-2, rtol=3e-2)


def test_router_logits_and_hidden_state_match(kernels):
    model = _model("all_blocks")
    ids = torch.randint(3, 96, (2, 12))
    outs = []
    for on in (True, False):
        cpu_kernels.enable_cpu_kernels(model, on)
        with torch.inference_mode():
            cache = model(ids[:, :10], use_cache=True).past_key_values
            outs.append(model(ids[:, 10:11], cache=cache, use_cache=True, output_router_logits=True))
    (fused, plain) = outs
    assert len(fused.router_logits) == len(plain.router_logits) == 2  # M*E-ME: two MoE layers
    for a, b in zip(fused.router_logits, plain.router_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.last_hidden_state, plain.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_key_value_buffers_grow_during_fused_decode(kernels):
    """The attention cache starts with room for 64 tokens; decoding past that moves the buffers."""
    model = _model("all_blocks")
    ids = torch.randint(3, 96, (1, 72))
    on, _ = _decode(model, ids, 60, True, kernels)
    off, _ = _decode(model, ids, 60, False)
    torch.testing.assert_close(on, off, atol=1e-4, rtol=1e-4)


def test_deep_copied_cache_gets_its_own_plan(kernels):
    """A prompt cache reused through deepcopy: each copy decodes on its own states, the original is untouched."""
    model = _model("all_blocks")
    ids = torch.randint(3, 96, (1, 14))
    ref, _ = _decode(model, ids, 10, False)
    cpu_kernels.enable_cpu_kernels(model, True)
    with torch.inference_mode():
        cache = model(ids[:, :10], use_cache=True).past_key_values
        first = model(ids[:, 10:11], cache=cache, use_cache=True).logits[:, -1]  # plan bound to `cache`
        for _ in range(2):
            copied = copy.deepcopy(cache)
            steps = [model(ids[:, t : t + 1], cache=copied, use_cache=True).logits[:, -1] for t in range(11, 14)]
            torch.testing.assert_close(torch.stack(steps, 1), ref[:, 1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first, ref[:, 0], atol=1e-4, rtol=1e-4)


def test_beam_search_and_greedy_generate_equal_module_path(kernels):
    model = _model("all_blocks")
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 96, (1, 8))
    outs = {}
    for on in (True, False):
        cpu_kernels.enable_cpu_kernels(model, on)
        with torch.inference_mode():
            outs[on] = (model.generate(ids, max_new_tokens=12, do_sample=False, num_beams=3),
                        model.generate(ids, max_new_tokens=12, do_sample=False))
    assert torch.equal(outs[True][0], outs[False][0])
    assert torch.equal(outs[True][1], outs[False][1])


def test_padded_batch_and_uncovered_blocks_keep_module_path(kernels):
    model = _model("all_blocks")
    ids = torch.randint(3, 96, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.inference_mode():
        cache = model(ids[:, :10], attention_mask=mask[:, :10], use_cache=True).past_key_values
        kernels.calls.clear()
        model(ids[:, 10:11], attention_mask=mask[:, :11], cache=cache, use_cache=True)
    assert "decode_step" not in kernels.calls
    rope = _model("latent_groups_mtp", use_rope=True)  # RoPE attention is not in the whole step: the modules run,
    ids = torch.randint(3, 96, (1, 12))                   # with the per-op kernels
    on, calls = _decode(rope, ids, 10, True, kernels)
    off, _ = _decode(rope, ids, 10, False)
    assert "decode_step" not in calls[1] and "mamba_step" in calls[1] and "moe_relu2" in calls[1]
    torch.testing.assert_close(on, off, atol=1e-4, rtol=1e-4)


def test_mtp_generate_with_fused_decode_equals_greedy(kernels):
    model = _model("latent_groups_mtp", moe_latent_size=None)  # all blocks covered, MTP head included
    ids = torch.randint(3, 96, (1, 9))
    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert cpu_kernels.enable_cpu_kernels(model)
        kernels.calls.clear()
        spec = model.generate(ids, max_new_tokens=10, do_sample=False, use_mtp=True, num_draft_tokens=2)
    assert "decode_step" in kernels.calls  # main model and MTP head through their plans
    assert torch.equal(plain, spec)


@pytest.mark.parametrize("router", [
    dict(moe_router_score_function="sigmoid"),
    dict(moe_router_score_function="sigmoid", norm_topk_prob=False, n_group=4, topk_group=2),
    dict(moe_router_score_function="softmax", norm_topk_prob=False),
    dict(moe_router_score_function="topk_softmax"),
])
def test_fused_router_equals_module_router(kernels, router):
    """The C++ router (scores, correction bias, group-limited top-k, normalisation, scaling) against
    Nemotron3Router, through whole decode steps with a non-zero correction bias."""
    model = _model("all_blocks", **router)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.randn(m.e_score_correction_bias.shape) * 0.05)
    ids = torch.randint(3, 96, (3, 14))
    on, calls = _decode(model, ids, 10, True, kernels, output_router_logits=True)
    off, _ = _decode(model, ids, 10, False)
    assert calls[0] == ["decode_step"]
    torch.testing.assert_close(on, off, atol=1e-4, rtol=1e-4)


def test_huge_pages_keep_contents_and_can_be_switched_off(monkeypatch):
    from transformers_nemotron3.cpu_kernels import hugepages

    if not hugepages.enabled():
        pytest.skip("no madvise here (not Linux)")
    big = torch.randn(6 * 1024 * 1024)  # 24 MB: several 2 MB pages inside
    small = torch.randn(1000)
    before = big.clone()
    assert hugepages.advise([big, small, None]) >= 8 * (2 << 20)  # small and None skipped, big advised
    assert torch.equal(big, before)
    assert hugepages.advise([big]) == 0  # each tensor once
    monkeypatch.setenv("NEMOTRON3_HUGEPAGES", "0")
    assert hugepages.advise([torch.randn(6 * 1024 * 1024)]) == 0


def test_decode_plan_reports_streamed_weights(kernels, monkeypatch):
    """A new plan hands its weights and the LM head to the kernels' side (huge pages), once per plan."""
    from transformers_nemotron3.cpu_kernels import hugepages

    seen = []
    monkeypatch.setattr(hugepages, "advise", lambda tensors: seen.append(list(tensors)))  # installed on enable
    model = _model("all_blocks")
    ids = torch.randint(3, 96, (1, 14))
    _decode(model, ids, 10, True, kernels)
    assert len(seen) == 1
    assert any(t is model.lm_head.weight for t in seen[0])
    assert any(t is model.backbone.layers[0].mixer.in_proj.weight for t in seen[0])
