"""The optional CPU decode kernels (`transformers_nemotron3.cpu_kernels`) against the PyTorch paths.

Each kernel is compared with the code it replaces: ``small_linear`` with ``F.linear`` (row counts
around the 8-row groups, odd and unaligned sizes, bias), ``moe_relu2`` with the dispatcher +
grouped-GEMM path (tokens sharing experts, latent MoE, shared expert), ``mamba_step`` with the
mixer's PyTorch decode step (conv bias, dt limits, several groups; states updated alike), and
whole-model cached decoding with the kernels on against off. The seams stay closed where they
must: under autograd, for other dtypes, for gated experts and for plugin-replaced GEMMs. The
kernels build with the machine's C++ compiler; without one these tests skip and say why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import randomize as _randomize
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3 import cpu_kernels
from transformers_nemotron3.modeling import fast_ops
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


def test_linear_uses_kernel_only_where_it_applies(kernels):
    lin = torch.nn.Linear(32, 24)
    x = torch.randn(3, 32)
    calls = kernels.calls
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(fast_ops.linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias),
                                   atol=1e-5, rtol=1e-5)
    assert calls == ["small_linear"]
    out = fast_ops.linear(x, lin.weight, lin.bias)  # autograd on: PyTorch path, gradients flow
    assert out.grad_fn is not None and calls == ["small_linear"]
    with torch.no_grad():
        fast_ops.linear(torch.randn(fast_ops.MAX_ROWS + 1, 32), lin.weight, lin.bias)  # too many rows: MKL
        half = lin.to(torch.float16)
        fast_ops.linear(torch.randn(2, 32, dtype=torch.float16), half.weight, half.bias)  # a dtype the kernel skips
    assert calls == ["small_linear"]


def _moe_layer(name: str, **overrides) -> Nemotron3MoE:
    torch.manual_seed(3)
    model = Nemotron3ForCausalLM(tiny_config(name, **overrides)).eval()
    layer = next(m for m in model.modules() if isinstance(m, Nemotron3MoE))
    _randomize(layer, seed=4)
    return layer


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 20])
def test_moe_kernel_equals_dispatcher_path(kernels, name, tokens, monkeypatch):
    from transformers_nemotron3.modeling import moe as moe_module

    layer = _moe_layer(name)
    x = torch.randn(tokens, 1, layer.config.hidden_size)
    with torch.no_grad():
        assert fast_ops.fused_moe_relu2_applies(layer.experts, x.view(tokens, -1))
        fused = layer(x)
        assert "moe_relu2" in kernels.calls
        cpu_kernels.enable_cpu_kernels(False)
        monkeypatch.setattr(moe_module, "FEW_ROUTES_MAX", 0)  # the sort / grouped GEMM / combine path
        ref = layer(x)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tokens", [1, 8])
def test_moe_kernel_bf16_equals_dispatcher_path(kernels, tokens, monkeypatch):
    from transformers_nemotron3.modeling import moe as moe_module

    layer = _moe_layer("all_blocks").to(torch.bfloat16)
    x = torch.randn(tokens, 1, layer.config.hidden_size).bfloat16()
    with torch.no_grad():
        fused = layer(x)
        assert "moe_relu2" in kernels.calls
        cpu_kernels.enable_cpu_kernels(False)
        monkeypatch.setattr(moe_module, "FEW_ROUTES_MAX", 0)
        ref = layer(x)
    assert fused.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_moe_kernel_skips_gated_experts_autograd_and_plugins(kernels):
    from transformers_nemotron3.modeling.moe import grouped_mm

    gated = _moe_layer("all_blocks", moe_gated_experts=True, moe_expert_act="silu")
    x = torch.randn(2, gated.config.hidden_size)
    with torch.no_grad():
        assert not fast_ops.fused_moe_relu2_applies(gated.experts, x)
    layer = _moe_layer("all_blocks")
    assert not fast_ops.fused_moe_relu2_applies(layer.experts, x)  # autograd on
    with torch.no_grad():
        assert fast_ops.fused_moe_relu2_applies(layer.experts, x)
        assert not fast_ops.fused_moe_relu2_applies(layer.experts, torch.randn(fast_ops.MAX_MOE_TOKENS + 1, x.shape[1]))
        layer.experts.gemm = lambda a, w, c: grouped_mm(a, w, c)  # a plugin's GEMM (e.g. NVFP4)
        assert not layer.uses_default_paths()


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
            cpu_kernels.enable_cpu_kernels(on)
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
            cpu_kernels.enable_cpu_kernels(on)
            out = model(ids[:, :10], use_cache=True)
            cache = out.past_key_values
            caches.append(cache)
            steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1] for t in range(10, 16)]
            logits.append(torch.stack(steps, 1))
        cpu_kernels.enable_cpu_kernels(True)
        greedy_on = model.generate(ids[:, :10], max_new_tokens=8, do_sample=False)
        cpu_kernels.enable_cpu_kernels(False)
        greedy_off = model.generate(ids[:, :10], max_new_tokens=8, do_sample=False)
    # whole decode steps run as one decode_step call; with latent MoE (not fused) each other block is one
    # decode_step call and the MoE runs its module with the routed-expert kernel
    assert "decode_step" in kernels.calls
    plans = [entry[2] for entry in caches[0].decode_plans.values()]
    assert len(plans) == 1 and (plans[0] is not None) == (name == "all_blocks")
    if dtype == torch.float32:
        torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
        assert torch.equal(greedy_on, greedy_off)
    else:  # bf16: bf16 roundings where PyTorch's bf16 ops round
        torch.testing.assert_close(logits[0], logits[1], atol=3e-2, rtol=3e-2)
        assert greedy_on.shape == greedy_off.shape  # tokens may differ where bf16 roundings tie


def test_enable_reports_failure_and_keeps_pytorch_paths(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_load", lambda: False)
    monkeypatch.setattr(cpu_kernels, "_REASON", "building them failed (no compiler)")
    with caplog.at_level("WARNING"):
        assert cpu_kernels.enable_cpu_kernels() is False
    assert fast_ops.ops is None and not cpu_kernels.cpu_kernels_enabled()
    assert "no compiler" in caplog.text


@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 5, 100), (7, 16)])
def test_rms_norm_kernel_equals_reference(kernels, shape):
    from transformers_nemotron3.modeling.blocks import rms_norm_reference
    from transformers_nemotron3.modeling.norms import rms_norm

    gen = torch.Generator().manual_seed(11)
    x, w = torch.randn(*shape, generator=gen) * 3, torch.randn(shape[-1], generator=gen)
    with torch.no_grad():
        got = rms_norm(x, w, 1e-5)
    assert kernels.calls == ["rms_norm"]
    torch.testing.assert_close(got, rms_norm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)
    assert rms_norm(x.requires_grad_(), w, 1e-5).grad_fn is not None and kernels.calls == ["rms_norm"]


def test_router_logits_use_small_linear(kernels):
    layer = _moe_layer("all_blocks")
    x = torch.randn(2, layer.config.hidden_size)
    with torch.no_grad():
        logits = layer.gate(x)[0]
    assert "small_linear" in kernels.calls
    torch.testing.assert_close(logits, F.linear(x, layer.gate.weight), atol=1e-5, rtol=1e-5)


def test_speculative_rollback_with_kernels_equals_recompute(kernels):
    """Verification of a draft block runs as one fused step that records the Mamba states after each token;
    keeping 2 of 4 tokens continues exactly."""
    torch.manual_seed(12)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    _randomize(model, std=0.08, seed=13)
    ids = torch.randint(3, 96, (1, 14))
    wrong = torch.randint(3, 96, (1, 2))
    with torch.inference_mode():
        cpu_kernels.enable_cpu_kernels(False)
        full = model(ids, use_cache=False).logits
        cpu_kernels.enable_cpu_kernels(True)
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


def test_environment_variable_switches_kernels_on(kernels):
    import subprocess
    import sys

    code = "import transformers_nemotron3 as t; print(t.cpu_kernels_enabled())"
    env = {**__import__("os").environ, "NEMOTRON3_CPU_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_cli_builds_and_checks_kernels(kernels, monkeypatch, capsys):
    from transformers_nemotron3.cli import main

    assert main(["cpu-kernels"]) == 0
    assert "CPU kernels ready" in capsys.readouterr().out
    monkeypatch.setattr(cpu_kernels, "_load", lambda: False)
    monkeypatch.setattr(cpu_kernels, "_REASON", "building them failed (no compiler)")
    assert main(["cpu-kernels"]) == 1
    assert "no compiler" in capsys.readouterr().out
