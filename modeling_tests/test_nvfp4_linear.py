"""NVFP4 linear: forward/backward equal a plain quantize-dequantize-then-matmul reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_nvfp4_quantize import reference_quantize

from transformers_nemotron3.nvfp4 import (
    NVFP4GemmConfig,
    NVFP4Linear,
    nvfp4_linear,
    quantize_dequantize,
    random_hadamard_transform,
)

NO_SR = NVFP4GemmConfig(stochastic_rounding=False)


def ref_qdq_local(x: torch.Tensor, block_2d: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(code * block scale) in FP32 and the FP32 global decode scale, from the spec reference."""
    s_b, vals, s_dec = reference_quantize(x.detach().float().numpy(), block_2d)
    local = torch.from_numpy((vals * np.repeat(s_b, 16, axis=1)[:, : vals.shape[1]]).astype(np.float32))
    return local[:, : x.shape[1]], torch.tensor(s_dec)


def ref_gemm_nt(a: torch.Tensor, b: torch.Tensor, a2d: bool = False, b2d: bool = False) -> torch.Tensor:
    la, sa = ref_qdq_local(a, a2d)
    lb, sb = ref_qdq_local(b, b2d)
    return (la @ lb.T) * (sa * sb)


def pad_tokens(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, 0, (-t.shape[0]) % 16))


def reference_linear_grads(x, w, dy, cfg: NVFP4GemmConfig):
    y = ref_gemm_nt(x, w, b2d=cfg.weight_2d)
    dx = ref_gemm_nt(dy, w.T.contiguous(), b2d=cfg.weight_2d)
    dyt, xt = pad_tokens(dy).T, pad_tokens(x).T
    if cfg.wgrad_rht:
        dyt = random_hadamard_transform(dyt, bf16=cfg.rht_bf16)
        xt = random_hadamard_transform(xt, bf16=cfg.rht_bf16)
    dw = ref_gemm_nt(dyt, xt)
    return y, dx, dw


def _run(x, w, dy, cfg):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = nvfp4_linear(x, w, None, cfg)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("tokens", [64, 40])
@pytest.mark.parametrize("cfg", [NO_SR, NVFP4GemmConfig(stochastic_rounding=False, weight_2d=False, wgrad_rht=False)],
                         ids=["recipe_no_sr", "1d_no_rht"])
def test_linear_forward_backward_equal_reference_exactly(tokens, cfg):
    g = torch.Generator().manual_seed(tokens)
    x, w, dy = torch.randn(tokens, 96, generator=g), torch.randn(48, 96, generator=g), torch.randn(tokens, 48, generator=g)
    y, dx, dw = _run(x, w, dy, cfg)
    ry, rdx, rdw = reference_linear_grads(x, w, dy, cfg)
    assert torch.equal(y, ry)
    assert torch.equal(dx, rdx)
    assert torch.equal(dw, rdw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_linear_is_close_to_high_precision_within_stated_tolerance():
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(256, 128, generator=g), torch.randn(64, 128, generator=g), torch.randn(256, 64, generator=g)
    y, dx, dw = _run(x, w, dy, NVFP4GemmConfig())
    errs = _rel(y, x @ w.T), _rel(dx, dy @ w), _rel(dw, dy.T @ x)
    # Gaussian operands: ~0.10 (1x16) and ~0.11 (16x16) per operand; SR roughly 0.14 per draw.
    assert errs[0] < 0.20 and errs[1] < 0.25 and errs[2] < 0.25, errs
    assert all(e > 0.02 for e in errs), errs  # really quantized


def test_each_gemm_can_be_switched_off():
    g = torch.Generator().manual_seed(1)
    x, w, dy = torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g), torch.randn(32, 16, generator=g)
    y, dx, dw = _run(x, w, dy, NVFP4GemmConfig(fprop=False, dgrad=True, wgrad=False))
    assert torch.allclose(y, x @ w.T, atol=1e-5) and torch.allclose(dw, dy.T @ x, atol=1e-4)
    assert not torch.allclose(dx, dy @ w, atol=1e-2)
    y, dx, dw = _run(x, w, dy, NVFP4GemmConfig().with_bf16("all"))
    assert torch.allclose(dx, dy @ w, atol=1e-4)
    with pytest.raises(ValueError, match="which="):
        NVFP4GemmConfig().with_bf16("middle")


def test_stochastic_rounding_makes_weight_gradients_unbiased():
    """E[SR(dY^T)] = dY^T, so the mean Wgrad over draws tends to rht(dY^T) @ Q(rht(X^T))^T."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x, w, dy = torch.randn(64, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(64, 32, generator=g)
    cfg = NVFP4GemmConfig()
    dws = torch.stack([_run(x, w, dy, cfg)[2] for _ in range(64)])
    dyt = random_hadamard_transform(dy.T.contiguous(), bf16=True)
    xt = random_hadamard_transform(x.T.contiguous(), bf16=True)
    expected = dyt @ quantize_dequantize(xt).T  # dY unquantized, X^T quantized with RNE
    single, mean = _rel(dws[0], expected), _rel(dws.mean(0), expected)
    assert not torch.equal(dws[0], dws[1])  # draws differ
    assert single > 0.08, single
    assert mean < 0.03, mean  # ~ single / sqrt(64)


def test_nvfp4_linear_module_shares_parameters_and_matches_function():
    lin = nn.Linear(64, 32)
    q = NVFP4Linear.from_linear(lin, NO_SR)
    assert q.weight is lin.weight and q.bias is lin.bias
    assert set(q.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 16, 64)
    y = q(x)
    assert y.shape == (2, 16, 32)
    want = nvfp4_linear(x, lin.weight, lin.bias, NO_SR)
    assert torch.equal(y, want)
    assert "nvfp4=fprop+dgrad+wgrad" in repr(q)
    assert isinstance(q.to_linear(), nn.Linear) and q.to_linear().weight is lin.weight
    y.sum().backward()
    assert lin.bias.grad is not None and torch.allclose(lin.bias.grad, torch.full((32,), 32.0))


def test_autocast_bf16_output_dtype_and_exact_emulation():
    lin = NVFP4Linear.from_linear(nn.Linear(32, 16, bias=False), NO_SR)
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, lin(x).to(torch.bfloat16))


def test_bf16_parameters_give_bf16_gradients():
    w = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    nvfp4_linear(x, w).float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="in_features"):
        nvfp4_linear(torch.randn(2, 8), torch.randn(4, 16))


def test_bf16_gemm_operands_are_exact_and_only_the_output_is_rounded():
    g = torch.Generator().manual_seed(4)
    x, w, dy = torch.randn(48, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(48, 32, generator=g)
    cfg32 = NVFP4GemmConfig(stochastic_rounding=False)
    cfg16 = NVFP4GemmConfig(stochastic_rounding=False, gemm_dtype=torch.bfloat16)
    lx, sx = ref_qdq_local(x)
    lw, sw = ref_qdq_local(w, True)
    y16 = _run(x, w, dy, cfg16)[0]
    assert torch.equal(y16, (lx.bfloat16() @ lw.bfloat16().T).float() * (sx * sw))
    for a, b in zip(_run(x, w, dy, cfg16), _run(x, w, dy, cfg32)):
        assert _rel(a, b) < 4e-3  # BF16 output rounding only (2^-9 relative per element)
    with pytest.raises(ValueError, match="gemm_dtype"):
        NVFP4GemmConfig(gemm_dtype=torch.float16)
