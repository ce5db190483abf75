"""The whole-sequence CPU kernels (`cpu_kernels.train_ops`: conv + SiLU, gated group RMSNorm and the block
RMSNorm, squared ReLU; forward and backward) against the PyTorch paths they replace, kernel by kernel and in whole
training steps.

References: the conv through ``F.conv1d`` (`mamba2.causal_conv`, packed sequences by its tap loop) and SiLU; the
norm written out op by op (`mamba2.gated_rms_norm_reference`); the model with the kernels switched off. Shapes
that stress the kernels' blocking: channel counts that are not multiples of the 16-float vectors or 64-channel
blocks, strided rows (slices of in_proj's output, as the mixer passes them), sequences shorter than the conv,
packed rows. The kernels build with the machine's C++ compiler; without one these tests skip and say why.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import randomize as _randomize
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3 import cpu_kernels
from transformers_nemotron3.cpu_kernels.train_ops import cpu_conv_silu, cpu_gated_rms_norm
from transformers_nemotron3.modeling.mamba2 import GatedRMSNorm, causal_conv, gated_rms_norm_reference


def _packed(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.rand(batch, length, generator=gen) < 0.25
    starts[:, 0] = False
    return torch.cumsum(starts.long(), dim=1)


@pytest.mark.parametrize("batch,length,channels,k", [(2, 37, 70, 4), (1, 3, 20, 4), (3, 64, 200, 3), (2, 9, 16, 2)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_silu_kernel_equals_conv1d(kernels, batch, length, channels, k, packed, bias):
    gen = torch.Generator().manual_seed(batch * 100 + length)
    wide = torch.randn(batch, length, channels + 13, generator=gen)  # x is a strided slice, as in the mixer
    x = wide[..., 5 : 5 + channels]
    w = torch.randn(channels, k, generator=gen) * 0.5
    b = torch.randn(channels, generator=gen) * 0.1 if bias else None
    seq_idx = _packed(batch, length, gen) if packed else None
    grad = torch.randn(batch, length, channels, generator=gen)

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, *([b] if bias else []))]
    ref = F.silu(causal_conv(leaves[0].transpose(1, 2), leaves[1], leaves[2] if bias else None, None,
                             seq_idx).transpose(1, 2))
    ref.backward(grad)

    ins = [wide.detach().clone().requires_grad_(True), w.clone().requires_grad_(True),
           *([b.clone().requires_grad_(True)] if bias else [])]
    kernels.calls.clear()
    got = cpu_conv_silu(ins[0][..., 5 : 5 + channels], ins[1], ins[2] if bias else None, seq_idx)
    got.backward(grad)
    assert kernels.calls == ["conv_silu", "conv_silu_backward"]
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ins[0].grad[..., 5 : 5 + channels], leaves[0].grad, atol=2e-6, rtol=1e-5)
    assert ins[0].grad[..., :5].abs().max() == 0 and ins[0].grad[..., 5 + channels :].abs().max() == 0
    for got_leaf, ref_leaf in zip(ins[1:], leaves[1:]):
        torch.testing.assert_close(got_leaf.grad, ref_leaf.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference: the forward op alone
        torch.testing.assert_close(cpu_conv_silu(x, w, b, seq_idx), ref.detach(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("rows,size,groups", [(7, 48, 3), (33, 80, 2), (5, 1024, 8), (1, 24, 1)])
def test_gated_norm_kernel_equals_reference(kernels, rows, size, groups):
    gen = torch.Generator().manual_seed(rows + size)
    y = torch.randn(2, rows, size, generator=gen)
    zwide = torch.randn(2, rows, size + 7, generator=gen)  # z is a strided slice of in_proj's output
    norm = GatedRMSNorm(size, groups, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(size, generator=gen))
    grad = torch.randn(2, rows, size, generator=gen)

    yr, zr = y.clone().requires_grad_(True), zwide[..., :size].clone().requires_grad_(True)
    wr = norm.weight.detach().clone().requires_grad_(True)
    ref = gated_rms_norm_reference(yr, zr, wr, norm.group_size, norm.eps, torch.float32)
    ref.backward(grad)

    yk, zk = y.clone().requires_grad_(True), zwide.clone().requires_grad_(True)
    kernels.calls.clear()
    got = cpu_gated_rms_norm(norm, yk, zk[..., :size], torch.float32)
    got.backward(grad)
    assert kernels.calls == ["gated_rms_norm", "gated_rms_norm_backward"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(yk.grad, yr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zk.grad[..., :size], zr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.weight.grad, wr.grad, atol=1e-5, rtol=1e-5)
    # other dtypes are not the kernel's: the PyTorch ops run
    assert cpu_gated_rms_norm(norm, y.bfloat16(), zwide[..., :size].bfloat16(), torch.bfloat16) is None
    assert cpu_conv_silu(y.bfloat16(), torch.ones(size, 4), None, None) is None


@pytest.mark.parametrize("shape", [(2, 9, 512), (1, 3, 50), (4, 17)])
def test_block_norm_and_relu2_kernels_equal_reference(kernels, shape):
    from transformers_nemotron3.cpu_kernels.train_ops import cpu_relu2, cpu_rms_norm
    from transformers_nemotron3.modeling.blocks import Nemotron3RMSNorm, rms_norm_reference

    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen)
    x[..., 0] = 0.0  # relu's kink
    grad = torch.randn(*shape, generator=gen)
    norm = Nemotron3RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
    xr, wr = x.clone().requires_grad_(True), norm.weight.detach().clone().requires_grad_(True)
    ref = rms_norm_reference(xr, wr, norm.eps)
    ref.backward(grad)
    xk = x.clone().requires_grad_(True)
    kernels.calls.clear()
    got = cpu_rms_norm(norm, xk)
    got.backward(grad)
    assert kernels.calls == ["gated_rms_norm", "gated_rms_norm_backward"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xk.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.weight.grad, wr.grad, atol=1e-4, rtol=1e-5)

    xr, xk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = torch.square(F.relu(xr))
    ref.backward(grad)
    kernels.calls.clear()
    got = cpu_relu2(xk)
    got.backward(grad)
    assert kernels.calls == ["relu2", "relu2_backward"]
    assert torch.equal(got, ref) and torch.equal(xk.grad, xr.grad)  # one rounding each, as PyTorch's
    nan = torch.tensor([float("nan"), -1.0, 2.0], requires_grad=True)
    assert torch.equal(torch.isnan(cpu_relu2(nan)), torch.tensor([True, False, False]))


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp"])
def test_training_step_with_kernels_equals_without(kernels, name):
    """Loss and every gradient of a training step (packed rows, right padding, the MTP loss where the config has
    it) with the kernels on equal the PyTorch paths'; the kernels ran forward and backward in every Mamba layer,
    every block norm and the relu^2 experts."""
    torch.manual_seed(21)
    plain = Nemotron3ForCausalLM(tiny_config(name)).train()
    _randomize(plain, std=0.08, seed=22)
    fast = copy.deepcopy(plain)
    assert cpu_kernels.enable_cpu_kernels(fast)
    ids = torch.randint(3, 96, (2, 23))
    mask = torch.ones_like(ids)
    mask[1, 19:] = 0
    seq_idx = torch.tensor([[0] * 9 + [1] * 14, [0] * 23])
    labels = ids.masked_fill(mask == 0, -100)
    outs = []
    for model in (plain, fast):
        kernels.calls.clear()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, seq_idx=seq_idx, use_cache=False)
        out.loss.backward()
        outs.append(out)
        counts = {op: kernels.calls.count(op) for op in ("conv_silu", "conv_silu_backward", "gated_rms_norm",
                                                          "gated_rms_norm_backward", "relu2", "relu2_backward")}
        if model is plain:
            assert sum(counts.values()) == 0
            continue
        mamba_layers = model.config.hybrid_override_pattern.count("M")
        layers = len(model.config.hybrid_override_pattern)
        assert counts["conv_silu"] == counts["conv_silu_backward"] == mamba_layers
        # every Mamba gated norm and every block norm, forward and backward
        assert counts["gated_rms_norm"] == counts["gated_rms_norm_backward"] >= mamba_layers + layers
        assert counts["relu2"] == counts["relu2_backward"] > 0  # the relu^2 experts and shared experts
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-4, rtol=1e-4)
    for (pname, p_plain), p_fast in zip(plain.named_parameters(), fast.parameters()):
        if p_plain.grad is None:
            assert p_fast.grad is None, pname
            continue
        scale = p_plain.grad.abs().max().clamp_min(1e-6)
        assert ((p_fast.grad - p_plain.grad).abs().max() / scale) < 1e-4, pname


def test_kernels_off_again_restores_the_pytorch_seams(kernels):
    model = Nemotron3ForCausalLM(tiny_config("all_blocks"))
    other = Nemotron3ForCausalLM(tiny_config("all_blocks"))
    assert cpu_kernels.enable_cpu_kernels(model)
    from transformers_nemotron3.cpu_kernels.train_ops import cpu_relu2
    from transformers_nemotron3.modeling.moe import _relu2

    mixers = [m for m in model.modules() if hasattr(m, "sequence_mixer")]
    assert mixers and all(m.norm.kernel is cpu_gated_rms_norm for m in mixers)
    assert all(m.norm.kernel is None for m in other.modules() if hasattr(m, "sequence_mixer"))
    acts = [m for m in model.modules() if type(m).__name__ in ("Nemotron3Experts", "Nemotron3MLP")]
    assert acts and all(getattr(m, "act_fn", None) is cpu_relu2 or getattr(m, "act", None) is cpu_relu2 for m in acts)
    cpu_kernels.enable_cpu_kernels(model, False)
    assert all(m.norm.kernel is None and m.sequence_mixer.conv_silu is None for m in mixers)
    assert all(m.kernel is None for m in model.modules() if type(m).__name__ == "Nemotron3RMSNorm")
    assert all(m.act is _relu2 for m in acts)
    ids = torch.randint(3, 96, (1, 12))
    kernels.calls.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    assert kernels.calls == []


def test_kernels_under_gradient_checkpointing_and_other_dtypes(kernels):
    """With activation checkpointing the blocks' forwards run twice (the kernels' Functions recompute cleanly) and
    the gradients equal those without; a bf16 copy of the model with the kernels on trains on the PyTorch ops."""
    torch.manual_seed(23)
    plain = Nemotron3ForCausalLM(tiny_config("all_blocks")).train()
    _randomize(plain, std=0.08, seed=24)
    fast = copy.deepcopy(plain)
    assert cpu_kernels.enable_cpu_kernels(fast)
    half = copy.deepcopy(fast).to(torch.bfloat16)  # the kernels stay switched on in the copy
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 96, (2, 21))
    plain(input_ids=ids, labels=ids).loss.backward()
    kernels.calls.clear()
    fast(input_ids=ids, labels=ids).loss.backward()
    assert kernels.calls.count("conv_silu") == 2 * kernels.calls.count("conv_silu_backward") > 0  # recomputed
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        if a.grad is not None:
            assert ((b.grad - a.grad).abs().max() / a.grad.abs().max().clamp_min(1e-6)) < 1e-4, name

    assert cpu_kernels.cpu_kernels_enabled(half) and all(
        m.kernel is not None for m in half.modules() if type(m).__name__ in ("GatedRMSNorm", "Nemotron3RMSNorm"))
    kernels.calls.clear()
    loss = half(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and kernels.calls == []
