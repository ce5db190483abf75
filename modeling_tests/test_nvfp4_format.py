"""Bit-level tests of the NVFP4 element formats against tables written from the spec."""

from __future__ import annotations

import itertools

import pytest
import torch

from transformers_nemotron3.nvfp4 import (
    e2m1_decode,
    e2m1_encode_rne,
    e2m1_encode_stochastic,
    e4m3_saturating_cast,
    pack_nibbles,
    unpack_nibbles,
)

# The eight E2M1 magnitudes by code, from the bit layout s_ee_m with bias 1.
E2M1_TABLE = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, 6: 4.0, 7: 6.0}


def test_every_e2m1_code_decodes_to_its_value():
    codes = torch.arange(16, dtype=torch.uint8)
    got = e2m1_decode(codes)
    for c in range(16):
        mag = E2M1_TABLE[c & 7]
        want = -mag if c & 8 else mag
        assert got[c].item() == want, c
        assert torch.signbit(got[c]).item() == bool(c & 8), c  # code 8 is -0.0


def test_e2m1_decode_is_exact_from_bits():
    # value = 2^(e-1) * (1 + m/2) for e > 0, m/2 for e == 0 (subnormal)
    for c in range(8):
        e, m = c >> 1, c & 1
        want = (2.0 ** (e - 1)) * (1 + m / 2) if e else m / 2
        assert e2m1_decode(torch.tensor([c], dtype=torch.uint8)).item() == want


@pytest.mark.parametrize(
    "value,expected",
    [(0.25, 0.0), (0.26, 0.5), (0.74, 0.5), (0.75, 1.0), (1.25, 1.0), (1.26, 1.5), (1.75, 2.0),
     (2.5, 2.0), (2.51, 3.0), (3.5, 4.0), (5.0, 4.0), (5.01, 6.0), (6.0, 6.0), (7.0, 6.0),
     (1e30, 6.0), (float("inf"), 6.0), (0.0, 0.0)],
)
def test_e2m1_rne_ties_to_even_and_saturates(value, expected):
    for sign in (1.0, -1.0):
        x = torch.tensor([sign * value], dtype=torch.float32)
        code = e2m1_encode_rne(x)
        assert e2m1_decode(code).item() == sign * expected
        assert bool(code.item() & 8) == (sign < 0)


def test_e2m1_rne_matches_brute_force_nearest_even():
    x = torch.linspace(-8, 8, 20001)
    got = e2m1_decode(e2m1_encode_rne(x))
    grid = torch.tensor([E2M1_TABLE[c] for c in range(8)], dtype=torch.float64)
    a = x.double().abs().clamp(max=6.0)
    dist = (a[:, None] - grid[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    cand = (dist == best)
    # among equally near codes pick the even one (mantissa bit 0)
    even = torch.arange(8) % 2 == 0
    code = torch.where((cand & even).any(1), (cand & even).float().argmax(1), cand.float().argmax(1))
    want = grid[code] * torch.where(x < 0, -1.0, 1.0).double()
    assert torch.equal(got.double(), want)


def _e4m3_table() -> torch.Tensor:
    """All non-negative finite E4M3 (fn) values by code 0..126, from the bit layout (bias 7)."""
    vals = []
    for e, m in itertools.product(range(16), range(8)):
        if e == 15 and m == 7:
            continue  # NaN
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


def _e4m3_oracle(x: torch.Tensor) -> torch.Tensor:
    table = _e4m3_table()
    a = x.double().clamp(max=448.0)
    dist = (a[:, None] - table[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    cand = dist == best
    even = torch.arange(len(table)) % 2 == 0
    idx = torch.where((cand & even).any(1), (cand & even).float().argmax(1), cand.float().argmax(1))
    return table[idx]


def test_e4m3_table_limits():
    t = _e4m3_table()
    assert t.max().item() == 448.0 and t[1].item() == 2.0**-9 and t[8].item() == 2.0**-6


def test_e4m3_cast_matches_oracle_including_ties_subnormals_and_saturation():
    table = _e4m3_table()
    mids = (table[1:] + table[:-1]) / 2  # exact ties between neighbours
    x = torch.cat([
        table, mids, mids * (1 + 1e-6), mids * (1 - 1e-6),
        torch.tensor([2.0**-10, 2.0**-10 * 1.01, 2.0**-11, 448.0, 464.0, 479.9, 480.0, 1e6, 3.0e38]),
        torch.rand(5000, dtype=torch.float64) * 500,
        torch.exp2(torch.rand(5000, dtype=torch.float64) * 20 - 12),
    ]).float()
    got = e4m3_saturating_cast(x).float().double()
    want = _e4m3_oracle(x)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert e4m3_saturating_cast(torch.tensor([2.0**-10])).float().item() == 0.0  # tie to even (0)
    assert e4m3_saturating_cast(torch.tensor([1e9])).float().item() == 448.0  # no NaN


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (7, 32), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (7, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)
    # even element in the low nibble: [1, 2] -> 0x21
    assert pack_nibbles(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x21


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError, match="even last dimension"):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))


def test_stochastic_rounding_is_unbiased_and_stays_within_one_step():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4096, generator=g) * 12 - 6)
    draws = torch.stack([e2m1_decode(e2m1_encode_stochastic(x, g)) for _ in range(256)])
    rne = e2m1_decode(e2m1_encode_rne(x))
    grid = torch.tensor(sorted(set(E2M1_TABLE.values())))
    # every draw is one of the two grid neighbours of x
    a = x.abs()
    lo = grid[(torch.searchsorted(grid, a, right=True) - 1).clamp(0, 7)]
    hi = grid[torch.searchsorted(grid, a).clamp(0, 7)]
    da = draws.abs()
    assert bool(((da == lo) | (da == hi)).all())
    assert bool((torch.sign(draws) * torch.sign(x) >= 0).all())
    # unbiased: mean error of 256 draws is far below the deterministic RNE error
    mean_err = (draws.mean(0) - x).abs().mean().item()
    rne_err = (rne - x).abs().mean().item()
    bias = (draws.mean(0) - x).mean().item()
    assert mean_err < 0.25 * rne_err, (mean_err, rne_err)
    assert abs(bias) < 5e-3, bias


def test_stochastic_rounding_midpoint_splits_evenly_and_keeps_grid_points():
    g = torch.Generator().manual_seed(1)
    x = torch.full((20000,), 1.25)
    up = (e2m1_decode(e2m1_encode_stochastic(x, g)) == 1.5).float().mean().item()
    assert 0.48 < up < 0.52
    on_grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -3.0])
    assert torch.equal(e2m1_decode(e2m1_encode_stochastic(on_grid.repeat(100), g)), on_grid.repeat(100))
    assert e2m1_decode(e2m1_encode_stochastic(torch.tensor([9.0, -100.0]), g)).tolist() == [6.0, -6.0]


def test_value_rounding_fast_path_equals_encode_decode():
    from transformers_nemotron3.nvfp4.format import e2m1_round_rne

    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 0.0, -0.0, float("inf")])
    x = torch.cat([torch.linspace(-8, 8, 40001), ties, -ties, torch.randn(10000) * 3])
    fast = e2m1_round_rne(x)
    slow = e2m1_decode(e2m1_encode_rne(x))
    assert torch.equal(fast, slow)
    assert torch.equal(torch.signbit(fast), torch.signbit(slow))  # -0.0 kept
