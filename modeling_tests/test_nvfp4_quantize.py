"""NVFP4 quantizer vs an independent reference written here from the spec (TE operation order)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transformers_nemotron3.nvfp4 import (
    NVFP4Tensor,
    e2m1_decode,
    global_encode_scale,
    inverse_random_hadamard_transform,
    quantize_dequantize,
    random_hadamard_transform,
    rht_matrix,
)

F32 = np.float32
FLT_MAX = np.finfo(np.float32).max
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _e4m3_values() -> np.ndarray:
    v = [m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7) for e in range(16) for m in range(8)]
    return np.array(v[:-1])  # drop the NaN code


E4M3 = _e4m3_values()


def _round_to_table(a: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Nearest table value to non-negative ``a`` (already clamped), ties to the even index."""
    idx = np.clip(np.searchsorted(table, a), 1, len(table) - 1)
    lo, hi = table[idx - 1], table[idx]
    d_lo, d_hi = a - lo, hi - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (idx % 2 == 0))
    return np.where(pick_hi, hi, lo)


def reference_quantize(x: np.ndarray, block_2d: bool = False):
    """Spec reference: returns (block scales per 1x16 row block as float, element values)."""
    x = x.astype(F32)
    rows, cols = x.shape
    pr, pc = (-rows) % 16 if block_2d else 0, (-cols) % 16
    xp = np.pad(x, ((0, pr), (0, pc)))
    amax = F32(np.abs(x).max())
    s_enc = F32(min(F32(448.0 * 6.0) / amax, FLT_MAX)) if amax > 0 else F32(1.0)
    if s_enc == 0:
        s_enc = F32(1.0)
    s_dec = F32(F32(1.0) / s_enc)
    R, C = xp.shape
    if block_2d:
        bam = np.abs(xp).reshape(R // 16, 16, C // 16, 16).max(axis=(1, 3)).repeat(16, axis=0)
    else:
        bam = np.abs(xp).reshape(R, C // 16, 16).max(axis=2)
    s_b = _round_to_table(np.minimum(bam * F32(s_enc * F32(1.0 / 6.0)), F32(448.0)).astype(F32), E4M3).astype(F32)
    with np.errstate(divide="ignore", over="ignore"):
        enc = np.minimum(F32(1.0) / (s_b * s_dec), FLT_MAX).astype(F32)
        scaled = (xp * enc.repeat(16, axis=1)).astype(F32)
    vals = _round_to_table(np.minimum(np.abs(scaled), 6.0), E2M1_GRID) * np.where(np.signbit(scaled), -1.0, 1.0)
    return s_b[:rows], vals[:rows], s_dec


def _hard_tensor(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian data with zero blocks, tiny blocks (subnormal / flushed scales) and outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[0, :16] = 0.0                          # a zero block
    x[1, :16] *= 3e-6                        # scale below the E4M3 subnormal range -> 0
    x[2, :16] *= 2e-4                        # subnormal E4M3 scale
    x[3, 16:32] *= 1e-3
    x[4, 5] = 100.0                          # tensor amax outlier
    x[5, :] = torch.linspace(-12, 12, cols)  # bin edges
    return x


@pytest.mark.parametrize("block_2d", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (40, 72), (1, 16)])
def test_quantizer_matches_spec_reference_bitwise(shape, block_2d):
    x = _hard_tensor(max(shape[0], 6), shape[1], seed=shape[0])[: shape[0]] if shape[0] >= 6 else torch.randn(shape)
    q = NVFP4Tensor.quantize(x, block_2d=block_2d)
    s_ref, v_ref, _ = reference_quantize(x.numpy(), block_2d)
    np.testing.assert_array_equal(q.scales.float().numpy(), s_ref)
    np.testing.assert_array_equal(e2m1_decode(q.codes()).numpy(), v_ref.astype(np.float32))


def test_hard_tensor_really_hits_zero_and_subnormal_scales():
    q = NVFP4Tensor.quantize(_hard_tensor(64, 128, 0))
    s = q.scales.float()
    assert s[0, 0] == 0 and s[1, 0] == 0                      # zero block, flushed block
    assert 0 < s[2, 0] < 2.0**-6                              # subnormal E4M3 scale
    assert s.max().item() == 448.0                            # the amax block reaches 448
    assert torch.equal(q.dequantize()[0, :16], torch.zeros(16))


def test_global_scale_edge_cases():
    assert global_encode_scale(torch.tensor(0.0)).item() == 1.0
    assert global_encode_scale(torch.tensor(2688.0)).item() == 1.0
    tiny = global_encode_scale(torch.tensor(1e-45))  # 2688/denormal overflows -> FLT_MAX clamp
    assert tiny.item() == torch.finfo(torch.float32).max
    z = NVFP4Tensor.quantize(torch.zeros(4, 32))
    assert torch.equal(z.dequantize(), torch.zeros(4, 32)) and z.global_encode_scale.item() == 1.0


def test_dequantized_values_are_exact_in_bf16():
    q = NVFP4Tensor.quantize(torch.randn(32, 64), block_2d=True)
    local = q.dequantize(apply_global_scale=False)
    assert torch.equal(local.to(torch.bfloat16).float(), local)


def test_2d_weight_codes_equal_their_transpose():
    w = torch.randn(48, 80)
    a = NVFP4Tensor.quantize(w, block_2d=True)
    b = NVFP4Tensor.quantize(w.T, block_2d=True)
    assert torch.equal(a.codes()[:, :80], b.codes()[:, :48].T)
    assert torch.equal(a.dequantize(), b.dequantize().T)


def test_packed_layout_and_shapes():
    q = NVFP4Tensor.quantize(torch.randn(3, 5, 40))
    assert q.data.shape == (3, 5, 24) and q.data.dtype == torch.uint8
    assert q.scales.shape == (3, 5, 3) and q.scales.dtype == torch.float8_e4m3fn
    assert q.dequantize().shape == (3, 5, 40)


def test_per_expert_global_scale():
    w = torch.randn(3, 32, 48)
    w[1] *= 1000.0
    amax = w.abs().amax(dim=(-2, -1), keepdim=True)
    q = NVFP4Tensor.quantize(w, block_2d=True, amax=amax)
    for e in range(3):
        assert torch.equal(q.dequantize()[e], NVFP4Tensor.quantize(w[e], block_2d=True).dequantize())


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="floating-point"):
        NVFP4Tensor.quantize(torch.ones(16, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_2d=False"):
        NVFP4Tensor.quantize(torch.ones(16), block_2d=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        random_hadamard_transform(torch.ones(4, 20))


def test_relative_rmse_on_gaussian_data():
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    rel = lambda y: ((x - y).norm() / x.norm()).item()  # noqa: E731
    r1 = rel(quantize_dequantize(x))
    r2 = rel(quantize_dequantize(x, block_2d=True))
    assert 0.09 < r1 < 0.10, r1        # measured 0.0951 (docs/nvfp4.md)
    assert 0.105 < r2 < 0.118, r2      # 16x16 blocks cost ~1.4 dB
    sr = rel(quantize_dequantize(x, stochastic=True))
    assert sr > r1                     # a single SR draw is noisier than RNE


def test_stochastic_quantization_is_unbiased_over_draws():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 64, generator=g)
    mean = torch.stack([quantize_dequantize(x, stochastic=True, generator=g) for _ in range(64)]).mean(0)
    rne = quantize_dequantize(x)
    assert ((mean - x).norm() / x.norm()).item() < 0.5 * ((rne - x).norm() / x.norm()).item()
    assert abs((mean - x).mean().item()) < 2e-3


def test_rht_is_orthogonal_and_matches_definition():
    m = rht_matrix()
    assert torch.allclose(m @ m.T, torch.eye(16), atol=1e-7)
    assert set(m.abs().unique().tolist()) == {0.25}
    x = torch.randn(8, 64)
    y = random_hadamard_transform(x)
    assert (inverse_random_hadamard_transform(y) - x).abs().max().item() < 1e-6
    assert math.isclose(y.norm().item(), x.norm().item(), rel_tol=1e-6)
    # row 0 of H16 is all ones: output column 0 of a tile is sum_j s_j x_j / 4
    s = torch.tensor([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1], dtype=torch.float32)
    assert torch.allclose(y[:, 0], (x[:, :16] * s).sum(1) / 4, atol=1e-6)
    yb = random_hadamard_transform(x, bf16=True)
    assert torch.equal(yb.to(torch.bfloat16).float(), yb)  # rounded to BF16 like TE
    # rotated dot products are preserved: (A M)(B M)^T = A B^T
    a, b = torch.randn(5, 32), torch.randn(7, 32)
    assert torch.allclose(random_hadamard_transform(a) @ random_hadamard_transform(b).T, a @ b.T, atol=1e-5)


def _torchao_block_agreement(x: torch.Tensor, nvfp4_quantize, per_tensor_amax_to_scale):
    rows, cols = x.shape
    ours = NVFP4Tensor.quantize(x)
    scales, packed = nvfp4_quantize(x, 16, per_tensor_amax_to_scale(x.abs().max()))
    ao_codes = torch.stack((packed & 0xF, packed >> 4), -1).reshape(rows, cols // 16, 16)
    same_scale = scales.view(torch.uint8).reshape(rows, cols // 16) == ours.scales.view(torch.uint8)
    same_codes = (ao_codes == ours.codes().reshape(rows, cols // 16, 16)).all(-1)
    return same_scale & same_codes, ours.scales.float()


def test_against_torchao_mx_formats_fraction_of_differing_blocks():
    """torchao divides in another order and floors scales at 2^-6: measure, do not assert equality."""
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale
    except Exception as exc:  # pragma: no cover - environment dependent
        pytest.skip(f"torchao mx_formats not importable ({type(exc).__name__}: {exc}); optional comparison")
    g = torch.Generator().manual_seed(0)
    same, _ = _torchao_block_agreement(torch.randn(1024, 1024, generator=g), nvfp4_quantize, per_tensor_amax_to_scale)
    gauss_diff = 1.0 - same.float().mean().item()
    # wide dynamic range: per-block magnitudes spread over ~e^+-6, so many block scales fall
    # below torchao's 2^-6 floor
    spread = torch.exp(torch.randn(1024, 64, 1, generator=g) * 2).expand(1024, 64, 16).reshape(1024, 1024)
    same_w, our_scales = _torchao_block_agreement(torch.randn(1024, 1024, generator=g) * spread,
                                                  nvfp4_quantize, per_tensor_amax_to_scale)
    wide_diff = 1.0 - same_w.float().mean().item()
    print(f"torchao mx_formats vs TE order: {gauss_diff:.4%} of blocks differ on N(0,1), "
          f"{wide_diff:.2%} on wide-range data")
    assert gauss_diff < 0.01
    assert wide_diff > 0.0
    # every differing block on wide-range data is one whose TE-order scale is under the floor
    assert bool((our_scales[~same_w] < 2.0**-6).all())


def test_global_scale_is_one_true_division():
    """``2688 / amax`` must round once (TE ``fminf(448*6/amax, FLT_MAX)``), not ``2688 * (1/amax)``."""
    amax = torch.rand(20000, generator=torch.Generator().manual_seed(5)) * 10 + 1e-3
    want = np.float32(2688.0) / amax.numpy()
    got = global_encode_scale(amax).numpy()
    np.testing.assert_array_equal(got, want)
    twice = (2688.0 * (1.0 / amax.double()).float().double()).float().numpy()
    assert (twice != want).any()  # the two-rounding formula really differs somewhere


@pytest.mark.parametrize("block_2d", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
def test_fast_fake_quantize_equals_packed_tensor_path(block_2d, stochastic):
    """The emulation fast path (no codes, no packing) is bit-identical to NVFP4Tensor."""
    from transformers_nemotron3.nvfp4 import fake_quantize

    x = _hard_tensor(40, 72, seed=7)
    q = NVFP4Tensor.quantize(x, block_2d=block_2d, stochastic=stochastic, generator=torch.Generator().manual_seed(9))
    local, s_dec = fake_quantize(x, block_2d=block_2d, stochastic=stochastic, generator=torch.Generator().manual_seed(9))
    assert torch.equal(local, q.dequantize(apply_global_scale=False))
    assert torch.equal(s_dec, q.global_decode_scale)
    v, s = fake_quantize(torch.randn(24))  # 1-D input keeps its shape
    assert v.shape == (24,) and s.dim() == 0
