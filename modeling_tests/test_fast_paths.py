"""Fast paths against their plain references (design rule 3), forward and backward.

- chunked SSD scan: the inference branch (in-place decay buffer, no autograd) and the autograd
  branch both equal the step recurrence `ssd_reference`, with one and several chunks and packing;
- the grouped expert GEMM equals a per-token loop over each token's experts (forward + backward);
- a whole model's cached decode equals full recomputation, with the prefill long enough for
  several scan chunks;
- the MoE decode path (few routes: experts applied per route, no sort/scatter) equals the
  dispatcher path, and is switched off when a plugin replaces the GEMM or the dispatcher;
- the fused RMSNorm / gated RMSNorm (``F.rms_norm``) equal their op-by-op references, forward and
  backward. (The fused decode step `ssd_step` is checked against `ssd_reference` in
  test_packing_and_scan.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.modeling.moe import grouped_mm
from transformers_nemotron3.modeling.ssd import ssd_chunked, ssd_reference


def _scan_inputs(b=2, length=21, h=6, p=4, g=3, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, h, p, generator=gen)
    dt = torch.rand(b, length, h, generator=gen) * 0.5 + 0.01
    A = -torch.rand(h, generator=gen) - 0.1
    B, C = torch.randn(b, length, g, n, generator=gen), torch.randn(b, length, g, n, generator=gen)
    return x, dt, A, B, C, torch.randn(h, generator=gen), torch.randn(b, h, p, n, generator=gen)


@pytest.mark.parametrize("chunk", [5, 8, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_scan_inference_branch_equals_reference(chunk, packed):
    x, dt, A, B, C, D, init = _scan_inputs()
    seq = torch.tensor([[0] * 7 + [1] * 10 + [2] * 4, [0] * 15 + [1] * 6]) if packed else None
    with torch.inference_mode():
        y1, s1 = ssd_chunked(x, dt, A, B, C, chunk, D, init, seq)
    y2, s2 = ssd_reference(x, dt, A, B, C, D, init, seq)
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)


def test_chunked_scan_gradients_equal_reference():
    ts = [t.clone().requires_grad_(True) for t in _scan_inputs(seed=1)]
    x, dt, A, B, C, D, init = ts
    y1, s1 = ssd_chunked(x, dt, A, B, C, 8, D, init)
    y2, s2 = ssd_reference(x, dt, A, B, C, D, init)
    w1, w2 = torch.randn_like(y1), torch.randn_like(s1)
    g1 = torch.autograd.grad((y1 * w1).sum() + (s1 * w2).sum(), ts)
    g2 = torch.autograd.grad((y2 * w1).sum() + (s2 * w2).sum(), ts)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-3 * (1 + float(b.abs().max())), rtol=1e-3)


@pytest.mark.parametrize("torch_grouped_mm", [True, False])
def test_grouped_gemm_equals_per_token_loop_forward_backward(torch_grouped_mm, monkeypatch):
    """Both implementations of `grouped_mm` (torch._grouped_mm on CPU, the per-expert loop) equal per-token products."""
    from transformers_nemotron3.modeling import moe as moe_module

    if torch_grouped_mm and not moe_module._cpu_grouped_mm_available():
        pytest.skip("torch._grouped_mm does not run on CPU in this torch")
    monkeypatch.setattr(moe_module, "_TORCH_GROUPED_MM", torch_grouped_mm)
    calls = []
    if torch_grouped_mm:  # make sure the torch kernel is what runs
        real = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(0)
    E, tokens, k, d_in, d_out = 6, 9, 2, 8, 12
    x = torch.randn(tokens, d_in, generator=gen, requires_grad=True)
    weight = torch.randn(E, d_out, d_in, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)])
    idx[:, 0] = idx[:, 0].clamp(max=E - 2)  # leave room for an empty expert sometimes
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    fast = grouped_mm(x[order // k], weight, counts)
    ref = torch.stack([F.linear(x[order[i] // k], weight[flat[order[i]]]) for i in range(len(order))])
    torch.testing.assert_close(fast, ref)
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), [x, weight])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, weight])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)
    assert bool(calls) == torch_grouped_mm


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp"])
def test_cached_decode_after_multi_chunk_prefill_equals_full_recompute(name):
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config(name)).eval()
    ids = torch.randint(3, 96, (2, 27))  # 20-token prefill = 3 chunks of 8, then 7 decode steps
    with torch.inference_mode():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :20], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        steps = [out.logits[:, -1]]
        for t in range(20, 26):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 19:26], atol=1e-4, rtol=1e-4)


def test_recorded_verification_rollback_equals_recompute():
    """Speculative rollback: run 4 tokens recording Mamba states, keep 2, continue == the plain sequence."""
    torch.manual_seed(1)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    ids = torch.randint(3, 96, (1, 14))
    wrong = torch.randint(3, 96, (1, 2))
    with torch.inference_mode():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :10], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        cache.start_recording()
        block = torch.cat([ids[:, 10:12], wrong], dim=1)
        verify = model(block, cache=cache, use_cache=True).logits
        cache.keep_first(2)
        assert cache.seen_tokens == 12
        rest = model(ids[:, 12:14], cache=cache, use_cache=True).logits
    torch.testing.assert_close(verify[:, :2], full[:, 10:12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rest, full[:, 12:14], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,overrides", [("all_blocks", {}), ("latent_groups_mtp", {}),
                                            ("all_blocks", {"moe_gated_experts": True, "moe_expert_act": "silu"})])
@pytest.mark.parametrize("tokens", [1, 2])
def test_moe_few_routes_decode_path_equals_dispatcher_path(name, overrides, tokens, monkeypatch):
    """The decode fast path (experts applied per chosen route) equals sort/dispatch/grouped GEMM/combine."""
    from transformers_nemotron3.modeling import moe as moe_module

    torch.manual_seed(2)
    model = Nemotron3ForCausalLM(tiny_config(name, **overrides)).eval()
    layer = next(m for m in model.modules() if isinstance(m, moe_module.Nemotron3MoE))
    for p in layer.parameters():  # random (not init-zero) weights everywhere
        p.data.normal_(0.0, 0.1)
    x = torch.randn(tokens, 1, model.config.hidden_size)
    taken = []
    real = moe_module.routed_few_tokens
    monkeypatch.setattr(moe_module, "routed_few_tokens", lambda *a: taken.append(1) or real(*a))
    with torch.no_grad():
        fast = layer(x)
        assert taken == [1]
        monkeypatch.setattr(moe_module, "FEW_ROUTES_MAX", 0)
        ref = layer(x)
        assert taken == [1]
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(moe_module, "FEW_ROUTES_MAX", 8)
    # seams replaced by plugins (NVFP4 GEMM, EP dispatcher) or autograd switch the fast path off
    layer(x[:1])  # grad enabled here
    with torch.no_grad():
        layer.experts.gemm = lambda x, w, c: grouped_mm(x, w, c)
        layer(x[:1])
        layer.experts.gemm = grouped_mm
        layer.dispatcher = type("Other", (moe_module.LocalDispatcher,), {})()
        layer(x[:1])
    assert taken == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norms_equal_reference_forward_backward(dtype):
    """`Nemotron3RMSNorm` and `GatedRMSNorm` equal their op-by-op references: values (with and without
    autograd) and grads."""
    from transformers_nemotron3.modeling.blocks import Nemotron3RMSNorm, rms_norm_reference
    from transformers_nemotron3.modeling.mamba2 import GatedRMSNorm, gated_rms_norm_reference

    torch.manual_seed(3)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    norm = Nemotron3RMSNorm(32, 1e-5)
    gated = GatedRMSNorm(32, 4, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        gated.weight.normal_(1.0, 0.3)
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    z = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    for fast_fn, ref_fn, inputs, params in [
        (lambda: norm(x), lambda: rms_norm_reference(x, norm.weight, norm.eps), [x], [norm.weight]),
        (lambda: gated(x, z, dtype), lambda: gated_rms_norm_reference(x, z, gated.weight, 8, 1e-5, dtype),
         [x, z], [gated.weight]),
    ]:
        fast, ref = fast_fn(), ref_fn()
        assert fast.dtype == ref.dtype == dtype
        torch.testing.assert_close(fast, ref, **tol)
        with torch.no_grad():  # inference form (vector_norm) as well as the autograd form (F.rms_norm)
            torch.testing.assert_close(fast_fn(), ref, **tol)
        w = torch.randn_like(fast)
        g_fast = torch.autograd.grad((fast.float() * w).sum(), inputs + params)
        g_ref = torch.autograd.grad((ref.float() * w).sum(), inputs + params)
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("length", [2, 9])
def test_channel_last_conv_equals_reference_conv(prefix, packed, length):
    """`causal_conv_last` (the scan's conv, in the projection layout) equals `causal_conv`, values, cache and grads."""
    from transformers_nemotron3.modeling.mamba2 import causal_conv, causal_conv_last

    gen = torch.Generator().manual_seed(3)
    b, ch, k = 2, 6, 4
    xbc = torch.randn(b, length, ch, generator=gen, requires_grad=True)
    w = torch.randn(ch, k, generator=gen, requires_grad=True)
    bias = torch.randn(ch, generator=gen, requires_grad=True)
    pre = torch.randn(b, ch, k - 1, generator=gen) if prefix else None
    seq = torch.tensor([[0] * 4 + [1] * 5, [0] * 7 + [1] * 2])[:, -length:] if packed else None
    out, hist = causal_conv_last(xbc, w, bias, pre, seq)
    ref = causal_conv(xbc.transpose(1, 2), w, bias, pre, seq).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    full = torch.cat([pre if prefix else torch.zeros(b, ch, k - 1), xbc.detach().transpose(1, 2)], dim=-1)
    torch.testing.assert_close(hist, full[..., -k:])
    g = torch.randn_like(out)
    # without a prefix (training) the backward is `_DepthwiseCausalConv`'s own, with one autograd's record
    torch.testing.assert_close(torch.autograd.grad((out * g).sum(), [xbc, w, bias]),
                               torch.autograd.grad((ref * g).sum(), [xbc, w, bias]))
    with torch.no_grad():  # the in-place branch, bit for bit the forward of the autograd one
        torch.testing.assert_close(causal_conv_last(xbc, w, bias, pre, seq)[0], out, rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_scan_with_strong_decay_equals_reference(grad):
    """Decays far below exp(-87) inside a chunk (the clamp floor of the intra-chunk exponent) change nothing."""
    x, dt, A, B, C, D, init = _scan_inputs(seed=4)
    A = A * 60.0  # dt * A down to about -40 per step: cumulative exponents of several hundred per chunk
    with torch.set_grad_enabled(grad):
        y1, s1 = ssd_chunked(x, dt, A, B, C, 16, D, init)
    y2, s2 = ssd_reference(x, dt, A, B, C, D, init)
    assert torch.isfinite(y1).all() and torch.isfinite(s1).all()
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decay_scale, n, form", [(1.0, 5, "factored 64"), (6.0, 5, "factored 32"), (30.0, 5, "pairwise"),
                                                   (6.0, 160, "pairwise"), ("head 4", 5, "mixed")])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_scan_forms_equal_reference(decay_scale, n, form, packed, monkeypatch):
    """Every in-chunk form of `ssd_chunked` equals the recurrence, forward and gradients: the factored one (chunk
    halved until every chunk's decay is at most ``_FACTORED_MAX_DECAY``, not below 32 tokens nor a quarter of the
    state size), the pairwise one (larger decays), and the mix (one head of six decays too fast: factored for
    all, pairwise for that head, which replaces its factored result)."""
    from transformers_nemotron3.modeling import ssd as ssd_module

    ran = []
    for name in ("_ssd_factored", "_ssd_pairwise"):
        real = getattr(ssd_module, name)
        monkeypatch.setattr(ssd_module, name,
                            lambda *a, _real=real, _n=name: ran.append((_n, a[5], a[0].shape[2])) or _real(*a))
    x, dt, A, B, C, D, init = _scan_inputs(b=2, length=77, n=n, seed=5)
    if form == "mixed":
        A = A.clone()
        A[4] = -40.0  # dt up to 0.5: hundreds per chunk for head 4 only
    else:
        A = A * decay_scale
    ts = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D, init)]
    seq = torch.tensor([[0] * 12 + [1] * 50 + [2] * 15, [0] * 70 + [1] * 7]) if packed else None
    y1, s1 = ssd_chunked(*ts[:5], 64, ts[5], ts[6], seq)
    y2, s2 = ssd_reference(*ts[:5], ts[5], ts[6], seq)
    expected = {"factored 64": [("_ssd_factored", 64, 6)], "factored 32": [("_ssd_factored", 32, 6)],
                "pairwise": [("_ssd_pairwise", 64, 6)],
                "mixed": [("_ssd_factored", 64, 6), ("_ssd_pairwise", 64, 1)]}[form]
    assert ran == expected
    assert torch.isfinite(y1).all()
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)
    w1, w2 = torch.randn_like(y1), torch.randn_like(s1)
    g1 = torch.autograd.grad((y1 * w1).sum() + (s1 * w2).sum(), ts)
    g2 = torch.autograd.grad((y2 * w1).sum() + (s2 * w2).sum(), ts)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-3 * (1 + float(b.abs().max())), rtol=1e-3)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("outputs", ["both", "starts", "final"])
def test_chunk_state_pass_equals_reference(outputs, scaled):
    """`ssd._StatePass` (the chunked scan's state pass with a hand-written backward) equals the op-by-op loop
    `state_pass_reference`: forward bit for bit, gradients of init, chunk states, carries and input scales."""
    from transformers_nemotron3.modeling.ssd import _StatePass, state_pass_reference

    gen = torch.Generator().manual_seed(5)
    b, nc, g, r, p, n = 2, 5, 2, 3, 4, 6
    init = torch.randn(b, g, r, p, n, generator=gen, requires_grad=True)
    chunk_states = torch.randn(b, nc, g, r, p, n, generator=gen, requires_grad=True)
    carry = torch.rand(b, nc, g, r, 1, 1, generator=gen).requires_grad_()
    inputs = [init, chunk_states, carry]
    if scaled:
        inputs.append(torch.rand(b, nc, g, r, 1, 1, generator=gen).requires_grad_())
    fast, ref = _StatePass.apply(*inputs), state_pass_reference(*inputs)
    for a, e in zip(fast, ref):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    weights = [torch.randn(t.shape, generator=gen) for t in ref]
    keep = {"both": (0, 1), "starts": (0,), "final": (1,)}[outputs]

    def loss(out):
        return sum((out[i] * weights[i]).sum() for i in keep)

    torch.testing.assert_close(torch.autograd.grad(loss(fast), inputs), torch.autograd.grad(loss(ref), inputs))


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_autograd_equals_reference(with_weight, dtype):
    """`norms.rms_norm` under autograd (`_RMSNorm`, hand-written backward) equals `F.rms_norm` in values and
    gradients, and its forward is bit for bit the no-grad branch's."""
    from transformers_nemotron3.modeling.norms import rms_norm

    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 5, 3, 16, generator=gen) * 3).to(dtype).requires_grad_()
    w = torch.randn(16, generator=gen, requires_grad=True) if with_weight else None
    out = rms_norm(x, w, 1e-5)
    ref = F.rms_norm(x.float(), (16,), w, 1e-5)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, w, 1e-5), out, rtol=0, atol=0)
    g = torch.randn(out.shape, generator=gen)
    inputs = [x, w] if with_weight else [x]
    torch.testing.assert_close(torch.autograd.grad((out * g).sum(), inputs),
                               torch.autograd.grad((ref * g).sum(), inputs))


def test_weighted_index_add_equals_plain_form(monkeypatch):
    """The MoE combine's `_WeightedIndexAdd` (row blocks, one gathered gradient) equals
    ``zeros.index_add_(0, token, rows * w)`` under autograd: output and both gradients."""
    from transformers_nemotron3.modeling import moe as moe_module

    monkeypatch.setattr(moe_module, "_ROW_BLOCK_BYTES", 7 * 4 * 3)  # blocks of 3 rows of 7 floats: several blocks
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(20, 7, generator=gen, requires_grad=True)
    w = torch.rand(20, generator=gen, requires_grad=True)
    token = torch.randint(0, 6, (20,), generator=gen)
    out = moe_module._WeightedIndexAdd.apply(rows, w, token, 6)
    ref = torch.zeros(6, 7).index_add(0, token, rows * w[:, None])
    torch.testing.assert_close(out, ref)
    g = torch.randn(6, 7, generator=gen)
    torch.testing.assert_close(torch.autograd.grad((out * g).sum(), [rows, w]),
                               torch.autograd.grad((ref * g).sum(), [rows, w]))
    only_w = moe_module._WeightedIndexAdd.apply(rows.detach(), w, token, 6)  # no gradient asked for the rows
    ref_w = torch.zeros(6, 7).index_add(0, token, rows.detach() * w[:, None])
    torch.testing.assert_close(torch.autograd.grad((only_w * g).sum(), w)[0], torch.autograd.grad((ref_w * g).sum(), w)[0])
