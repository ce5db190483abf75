"""The optional CPU decode kernels (`transformers_nemotron3.cpu_kernels`) against the PyTorch paths.

Each kernel is compared with the code it replaces: ``small_linear`` with ``F.linear`` (row counts
around the 8-row groups, odd and unaligned sizes, bias), ``moe_relu2`` (the ``"nemotron3_cpu"`` experts
implementation) with the dispatcher + grouped-GEMM path (tokens sharing experts, latent MoE, shared expert),
``mamba_step`` (the CPU sequence-mixer seam) with the mixer's PyTorch decode step (conv bias, dt limits,
several groups; states updated alike), and whole-model cached decoding with the kernels on against off. The
kernels are per model: a second model in the same process keeps its PyTorch paths, and saved checkpoints
carry no kernel files. The seams stay closed where they must: under autograd, for other dtypes, for gated
experts and for plugin-replaced GEMMs. The kernels build with the machine's C++ compiler; without one these
tests skip and say why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import randomize as _randomize
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3 import cpu_kernels
from transformers_nemotron3.cpu_kernels import build, ops
from transformers_nemotron3.modeling.cache import Nemotron3HybridCache
from transformers_nemotron3.modeling.moe import Nemotron3MoE


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16])
@pytest.mark.parametrize("in_f,out_f,bias", [(64, 48, False), (100, 37, True), (513, 7, True), (16, 1, False)])
def test_small_linear_equals_f_linear(kernels, rows, in_f, out_f, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_f, generator=gen)
    w = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen) if bias else None
    got = kernels.small_linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=2e-5, rtol=2e-5)
    # leading dims and a non-contiguous input
    x3 = torch.randn(2, in_f, rows, generator=gen).transpose(1, 2)
    torch.testing.assert_close(kernels.small_linear(x3, w, b), F.linear(x3, w, b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("rows", [1, 5, 8, 11])
@pytest.mark.parametrize("in_f,out_f,bias", [(64, 48, False), (100, 37, True)])
def test_small_linear_bf16_equals_f_linear(kernels, rows, in_f, out_f, bias):
    """bf16 weights and inputs, fp32 accumulation, output rounded to bf16: as PyTorch's bf16 linear."""
    gen = torch.Generator().manual_seed(rows + 100)
    x = torch.randn(rows, in_f, generator=gen).bfloat16()
    w = torch.randn(out_f, in_f, generator=gen).bfloat16()
    b = torch.randn(out_f, generator=gen).bfloat16() if bias else None
    got = kernels.small_linear(x, w, b)
    assert got.dtype == torch.bfloat16
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    # our only rounding is the final one to bf16 (fp32 sums of exact products are far finer)
    torch.testing.assert_close(got.double(), exact, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=3e-2, rtol=1.6e-2)  # both round once to bf16


def _moe_layer(name: str, **overrides) -> tuple[Nemotron3ForCausalLM, Nemotron3MoE]:
    torch.manual_seed(3)
    model = Nemotron3ForCausalLM(tiny_config(name, **overrides)).eval()
    layer = next(m for m in model.modules() if isinstance(m, Nemotron3MoE))
    _randomize(layer, seed=4)
    return model, layer


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 20])
def test_moe_kernel_equals_dispatcher_path(kernels, name, tokens, monkeypatch):
    from transformers_nemotron3.modeling import moe as moe_module

    model, layer = _moe_layer(name)
    x = torch.randn(tokens, 1, layer.config.hidden_size)
    assert cpu_kernels.enable_cpu_kernels(model) and model.config._experts_implementation == "nemotron3_cpu"
    with torch.no_grad():
        fused = layer(x)
        assert "moe_relu2" in kernels.calls
        cpu_kernels.enable_cpu_kernels(model, False)
        assert model.config._experts_implementation == "eager"
        monkeypatch.setattr(moe_module, "FEW_ROUTES_MAX", 0)  # the sort / grouped GEMM / combine path
        ref = layer(x)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tokens", [1, 8])
def test_moe_kernel_bf16_equals_dispatcher_path(kernels, tokens, monkeypatch):
    from transformers_nemotron3.modeling import moe as moe_module

    model, layer = _moe_layer("all_blocks")
    layer.to(torch.bfloat16)
    x = torch.randn(tokens, 1, layer.config.hidden_size).bfloat16()
    cpu_kernels.enable_cpu_kernels(model)
    with torch.no_grad():
        fused = layer(x)
        assert "moe_relu2" in kernels.calls
        cpu_kernels.enable_cpu_kernels(model, False)
        monkeypatch.setattr(moe_module, "FEW_ROUTES_MAX", 0)
        ref = layer(x)
    assert fused.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_moe_kernel_skips_gated_experts_autograd_and_plugins(kernels):
    """Where ``moe_relu2`` does not apply, the "nemotron3_cpu" experts run the eager forward: same results."""
    from transformers_nemotron3.modeling.moe import grouped_mm

    def run(model, layer, x, on):
        cpu_kernels.enable_cpu_kernels(model, on)
        kernels.calls.clear()
        return layer(x), list(kernels.calls)

    gated_model, gated = _moe_layer("all_blocks", moe_gated_experts=True, moe_expert_act="silu")
    x = torch.randn(2, 1, gated.config.hidden_size)
    with torch.no_grad():
        (on, calls), (off, _) = run(gated_model, gated, x, True), run(gated_model, gated, x, False)
    assert "moe_relu2" not in calls and torch.equal(on, off)
    model, layer = _moe_layer("all_blocks")
    on, calls = run(model, layer, x, True)  # autograd on
    assert "moe_relu2" not in calls and on.grad_fn is not None
    with torch.no_grad():
        many = torch.randn(ops.MAX_MOE_TOKENS + 1, 1, x.shape[-1])
        assert "moe_relu2" not in run(model, layer, many, True)[1]
        layer.experts.gemm = lambda a, w, c: grouped_mm(a, w, c)  # a plugin's GEMM (e.g. NVFP4)
        (on, calls), (off, _) = run(model, layer, x, True), run(model, layer, x, False)
    assert "moe_relu2" not in calls and torch.equal(on, off)


@pytest.mark.parametrize("overrides,dtype", [({}, torch.float32),
                                             ({"use_conv_bias": False, "time_step_limit": (0.05, 0.5)}, torch.float32),
                                             ({"n_groups": 4, "mamba_num_heads": 8}, torch.float32),
                                             ({}, torch.bfloat16)])
@pytest.mark.parametrize("batch", [1, 3])
def test_mamba_kernel_step_equals_pytorch_step(kernels, overrides, dtype, batch):
    torch.manual_seed(5)
    cfg = tiny_config("all_blocks", **overrides)
    model = Nemotron3ForCausalLM(cfg).eval()
    mixer = next(m for m in model.modules() if type(m).__name__ == "Nemotron3Mamba2Mixer")
    _randomize(mixer, std=0.3, seed=6)
    mixer.to(dtype)
    tol = 3e-5 if dtype == torch.float32 else 3e-2
    caches = [Nemotron3HybridCache(cfg, batch, dtype, "cpu") for _ in range(2)]
    gen = torch.Generator().manual_seed(7)
    conv0 = torch.randn(caches[0].get(mixer.layer_idx).conv.shape, generator=gen)
    ssm0 = torch.randn(caches[0].get(mixer.layer_idx).ssm.shape, generator=gen)
    for c in caches:
        st = c.get(mixer.layer_idx)
        st.conv.copy_(conv0)
        st.ssm.copy_(ssm0)
        st.has_previous = True
    outs = []
    with torch.no_grad():
        for on, cache in zip((True, False), caches):
            cpu_kernels.enable_cpu_kernels(model, on)
            steps = [mixer(torch.randn(batch, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(8 + t)).to(dtype),
                           cache=cache) for t in range(3)]
            outs.append(torch.cat(steps, 1))
    assert kernels.calls.count("mamba_step") == 3
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=tol, rtol=tol)
    a, b = caches[0].get(mixer.layer_idx), caches[1].get(mixer.layer_idx)
    torch.testing.assert_close(a.conv.float(), b.conv.float(), atol=tol, rtol=tol)  # in_proj outputs (summation order)
    torch.testing.assert_close(a.ssm, b.ssm, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_decode_with_kernels_equals_without(kernels, name, batch, dtype):
    torch.manual_seed(9)
    model = Nemotron3ForCausalLM(tiny_config(name)).eval()
    _randomize(model, std=0.08, seed=10)
    model.to(dtype)
    ids = torch.randint(3, 96, (batch, 16))
    kernels.calls.clear()
    logits, caches = [], []
    with torch.inference_mode():
        for on in (True, False):
            cpu_kernels.enable_cpu_kernels(model, on)
            out = model(ids[:, :10], use_cache=True)
            cache = out.past_key_values
            caches.append(cache)
            steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1] for t in range(10, 16)]
            logits.append(torch.stack(steps, 1))
        cpu_kernels.enable_cpu_kernels(model, True)
        greedy_on = model.generate(ids[:, :10], max_new_tokens=8, do_sample=False)
        cpu_kernels.enable_cpu_kernels(model, False)
        greedy_off = model.generate(ids[:, :10], max_new_tokens=8, do_sample=False)
    # whole decode steps run as one decode_step call, LatentMoE included
    assert "decode_step" in kernels.calls
    plans = [entry[2] for entry in caches[0].decode_plans.values()]
    assert len(plans) == 1 and plans[0] is not None
    if dtype == torch.float32:
        torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
        assert torch.equal(greedy_on, greedy_off)
    else:  # bf16: bf16 roundings where PyTorch's bf16 ops round
        torch.testing.assert_close(logits[0], logits[1], atol=3e-2, rtol=3e-2)
        assert greedy_on.shape == greedy_off.shape  # tokens may differ where bf16 roundings tie


def test_enable_reports_failure_and_keeps_pytorch_paths(monkeypatch, caplog):
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    monkeypatch.setattr(build, "_LOADED", False)
    monkeypatch.setattr(build, "_REASON", "building them failed (no compiler)")
    with caplog.at_level("WARNING"):
        assert cpu_kernels.enable_cpu_kernels(model) is False
    assert not cpu_kernels.cpu_kernels_enabled(model) and model.decode_backend is None
    assert model.config._experts_implementation == "eager"
    assert "no compiler" in caplog.text
    with pytest.raises(ValueError, match="Nemotron3ForCausalLM"):
        cpu_kernels.enable_cpu_kernels(model.model)


@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 5, 100), (7, 16)])
def test_rms_norm_kernel_equals_reference(kernels, shape):
    from transformers_nemotron3.modeling.blocks import rms_norm_reference

    gen = torch.Generator().manual_seed(11)
    x, w = torch.randn(*shape, generator=gen) * 3, torch.randn(shape[-1], generator=gen)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)


def test_speculative_rollback_with_kernels_equals_recompute(kernels):
    """Verification of a draft block runs as one fused step that records the Mamba states after each token;
    keeping 2 of 4 tokens continues exactly."""
    torch.manual_seed(12)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    _randomize(model, std=0.08, seed=13)
    ids = torch.randint(3, 96, (1, 14))
    wrong = torch.randint(3, 96, (1, 2))
    with torch.inference_mode():
        full = model(ids, use_cache=False).logits
        cpu_kernels.enable_cpu_kernels(model, True)
        out = model(ids[:, :10], use_cache=True)
        cache = out.past_key_values
        cache.start_recording()
        kernels.calls.clear()
        verify = model(torch.cat([ids[:, 10:12], wrong], dim=1), past_key_values=cache, use_cache=True).logits
        assert kernels.calls == ["decode_step"]  # the whole verification is one fused call
        recorded = [len(st.history) for st in cache.layers if getattr(st, "history", None) is not None]
        assert recorded == [4, 4]  # 4 tokens x 2 Mamba layers
        cache.keep_first(2)
        rest = model(ids[:, 12:14], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(verify[:, :2], full[:, 10:12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rest, full[:, 12:14], atol=1e-4, rtol=1e-4)


def test_two_models_in_one_process_and_saved_code_without_kernels(kernels, tmp_path):
    """Kernels on one model leave another (same weights) on its PyTorch paths; both decode to their reference,
    and the kernel model saves exactly what the plain one does: model files only, no experts implementation."""
    import json
    import os

    torch.manual_seed(14)
    with_kernels = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    _randomize(with_kernels, std=0.08, seed=15)
    plain = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    plain.load_state_dict(with_kernels.state_dict())
    ids = torch.randint(3, 96, (2, 14))
    with torch.inference_mode():
        reference = plain.generate(ids, max_new_tokens=6, do_sample=False)
        assert cpu_kernels.enable_cpu_kernels(with_kernels)
        kernels.calls.clear()
        fast = with_kernels.generate(ids, max_new_tokens=6, do_sample=False)
        assert "decode_step" in kernels.calls
        kernels.calls.clear()
        again = plain.generate(ids, max_new_tokens=6, do_sample=False)
        assert kernels.calls == []  # the other model never touched the kernels
    assert torch.equal(fast, reference) and torch.equal(again, reference)
    assert not cpu_kernels.cpu_kernels_enabled(plain) and plain.config._experts_implementation == "eager"
    for name, model in (("on", with_kernels), ("off", plain)):
        model.save_pretrained(tmp_path / name)
    files = {name: sorted(f for f in os.listdir(tmp_path / name) if f.endswith(".py")) for name in ("on", "off")}
    assert files["on"] == files["off"] and files["on"]
    assert not any("fast_ops" in f or "fused" in f or "kernel" in f for f in files["on"])
    saved = json.loads((tmp_path / "on" / "config.json").read_text())
    assert "nemotron3_cpu" not in json.dumps(saved)


def test_cli_builds_and_checks_kernels(kernels, monkeypatch, capsys):
    from transformers_nemotron3.cli import main

    assert main(["cpu-kernels"]) == 0
    assert "CPU kernels ready" in capsys.readouterr().out
    monkeypatch.setattr(build, "kernel_ops", lambda: None)
    monkeypatch.setattr(build, "_REASON", "building them failed (no compiler)")
    assert main(["cpu-kernels"]) == 1
    assert "no compiler" in capsys.readouterr().out
