"""The two number formats inside NVFP4, at the bit level.

NVFP4 stores every element as FP4 **E2M1** (1 sign, 2 exponent, 1 mantissa bit, bias 1,
no Inf/NaN) and every block of 16 elements with one **FP8 E4M3** scale (the "fn" variant:
bias 7, max finite 448, subnormals down to 2^-9, used unsigned). This file holds only
element-level operations: encode (round-to-nearest-even or stochastic), decode, the E4M3
cast of block scales and the nibble packing. How scales are *computed* lives in
``quantize.py``.

E2M1 code = ``sign << 3 | exponent << 1 | mantissa``; the eight magnitudes are
``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (codes 0..7), codes 8..15 are their negatives (8 is -0).
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
"""Largest finite E2M1 magnitude."""

E4M3_MAX = 448.0
"""Largest finite FP8 E4M3 ("fn") value."""

BLOCK_SIZE = 16
"""Number of elements sharing one E4M3 block scale."""

# Value of every 4-bit code, index = code.
E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)

# Round-to-nearest-even decision points on magnitudes. A magnitude strictly above a
# "tie-down" point or at-or-above a "tie-up" point moves to the next code. The ties
# 0.25, 1.25, 2.5, 5.0 sit next to an even code *below* (stay), the ties 0.75, 1.75, 3.5
# next to an even code *above* (move up). Everything above 5.0 saturates to 6.0.
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)


def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, device=device, dtype=dtype)


def e2m1_encode_rne(x: torch.Tensor) -> torch.Tensor:
    """Encode already-scaled values to E2M1 codes with round-to-nearest-even and saturation.

    This is what the PTX instruction ``cvt.rn.satfinite.e2m1x2.f32`` does: magnitudes above
    6 become 6, ties go to the even code. Returns a ``uint8`` tensor of codes 0..15 with the
    shape of ``x``. The sign of ``-0.0`` is kept (code 8).
    """
    a = x.abs()
    mag = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for t in _TIES_DOWN:
        mag += (a > t).to(torch.uint8)
    for t in _TIES_UP:
        mag += (a >= t).to(torch.uint8)
    return mag | (torch.signbit(x).to(torch.uint8) << 3)


def _grid_step(a: torch.Tensor) -> torch.Tensor:
    """Spacing of the E2M1 grid around magnitude ``a``: 0.5 below 2, 1 below 4, 2 above.

    Computed as ``0.5 * 2**([a >= 2] + [a >= 4])`` with in-place ops (few large allocations:
    this is the hot loop of the emulation).
    """
    s = (a >= 2.0).to(torch.float32)
    return s.add_(a >= 4.0).exp2_().mul_(0.5)


def e2m1_round_rne(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled FP32 values onto the E2M1 grid (RNE, saturating), returning values.

    Same result as ``e2m1_decode(e2m1_encode_rne(x))`` without building codes (tested): inside
    each binade the grid is uniform, and an even multiple of the step is exactly an even code,
    so ``round_half_even(|x| / step) * step`` reproduces the tie rule. Used by the emulation.
    """
    a = x.abs().float()
    step = _grid_step(a)
    return a.div_(step).round_().mul_(step).clamp_(max=E2M1_MAX).copysign_(x)


def e2m1_round_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastically round already-scaled values onto the E2M1 grid, returning values.

    Follows Transformer Engine's software fallback for ``cvt.rs``: with 8 random bits
    ``u = r / 256`` and the grid step at ``|x|``, ``t = |x| + u * step`` is floored onto the
    grid (step re-read at ``t``) and saturated at 6. A value between grid points
    ``lo < |x| < hi`` rounds up with probability ``(|x| - lo) / (hi - lo)`` (to within 1/256),
    so the rounding is unbiased in expectation; values on the grid are unchanged.
    """
    a = x.abs().float()
    r = torch.randint(0, 256, x.shape, device=x.device, generator=generator, dtype=torch.int32)
    t = r.to(torch.float32).mul_(1.0 / 256.0).mul_(_grid_step(a)).add_(a)
    step_t = _grid_step(t)
    return t.div_(step_t).floor_().mul_(step_t).clamp_(max=E2M1_MAX).copysign_(x.float())


def e2m1_encode_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode already-scaled values to E2M1 codes with stochastic rounding (see
    :func:`e2m1_round_stochastic`). Returns ``uint8`` codes 0..15."""
    return e2m1_encode_rne(e2m1_round_stochastic(x, generator))


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode E2M1 codes (``uint8`` 0..15) to their values in ``dtype``."""
    return _lut(codes.device, dtype)[codes.long()]


def e4m3_saturating_cast(x: torch.Tensor) -> torch.Tensor:
    """Round FP32 values to FP8 E4M3 with round-to-nearest-even, saturating at 448.

    Mirrors the ``satfinite`` conversion used for NVFP4 block scales: values above 448
    become 448 (a plain PyTorch cast would give NaN), values below half the smallest
    subnormal (2^-10) become 0. Returns a ``torch.float8_e4m3fn`` tensor.
    """
    return torch.clamp(x.float(), min=-E4M3_MAX, max=E4M3_MAX).to(torch.float8_e4m3fn)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack pairs of 4-bit codes along the last dimension into bytes.

    Element ``2i`` goes to the low nibble and element ``2i+1`` to the high nibble, the
    layout of Transformer Engine, torchao and ModelOpt. The last dimension must be even.
    """
    if codes.shape[-1] % 2:
        raise ValueError(
            f"pack_nibbles needs an even last dimension, got shape {tuple(codes.shape)}; "
            "pad the tensor to a multiple of 2 (NVFP4 tensors are padded to 16)."
        )
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: bytes -> codes, doubling the last dimension."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)
