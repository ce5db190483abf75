"""NVFP4 quantization: scales computed in Transformer Engine's order, and ``NVFP4Tensor``.

Two-level scaling, everything in FP32, operation order copied from the TE kernel so that
stored scales and codes match it bit for bit (the paper's formula text and torchao's
``mx_formats`` round in a different order and disagree on a fraction of blocks):

1. ``S_enc = min(448*6 / amax, FLT_MAX)``; ``S_enc = 1`` when ``amax == 0`` (tensor level).
2. ``S_dec = 1 / S_enc``.
3. block scale ``s_b = e4m3_satfinite(block_amax * (S_enc * fp32(1/6)))`` -- the product
   ``S_enc * (1/6)`` is formed first. No lower clamp: a tiny block stores scale 0.
4. ``enc_b = min(1 / (fp32(s_b) * S_dec), FLT_MAX)``.
5. code ``= e2m1(fp32(x) * enc_b)`` (RNE, or stochastic rounding for gradients).

Dequantization is ``value(code) * fp32(s_b) * S_dec``. Blocks are 16 contiguous elements
along the last dimension (1x16) or 16x16 tiles of the last two dimensions (2-D, used for
weights so that ``W`` and ``W^T`` get identical codes). Tensors whose blocked dimensions are
not multiples of 16 are zero-padded internally; zeros never change a block's amax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .format import (
    BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    e2m1_decode,
    e2m1_encode_rne,
    e2m1_encode_stochastic,
    e2m1_round_rne,
    e2m1_round_stochastic,
    e4m3_saturating_cast,
    pack_nibbles,
    unpack_nibbles,
)

FLT_MAX = torch.finfo(torch.float32).max


def global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor encode scale ``S_enc = min(448*6/amax, FLT_MAX)``, 1 for an all-zero tensor."""
    amax = amax.float()
    # A true FP32 division: ``python_scalar / tensor`` would compute ``scalar * (1/amax)`` and
    # round twice, which disagrees with the kernel on some amax values.
    s_enc = torch.clamp(torch.div(torch.full_like(amax, E4M3_MAX * E2M1_MAX), amax), max=FLT_MAX)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def _pad_to_block(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Zero-pad the last ``dims`` dimensions of ``x`` up to multiples of 16."""
    pad: list[int] = []
    for d in range(1, dims + 1):
        size = x.shape[-d]
        pad += [0, (-size) % BLOCK_SIZE]
    return F.pad(x, pad) if any(pad) else x


def _block_amax(a: torch.Tensor, block_2d: bool) -> torch.Tensor:
    """Block amax of the padded magnitudes ``a`` per 1x16 block, ``[..., R, C/16]`` (2-D tiles
    replicated on each of their rows)."""
    *lead, rows, cols = a.shape
    if not block_2d:
        return a.reshape(*lead, rows, cols // BLOCK_SIZE, BLOCK_SIZE).amax(-1)
    tiles = a.reshape(*lead, rows // BLOCK_SIZE, BLOCK_SIZE, cols // BLOCK_SIZE, BLOCK_SIZE)
    tile_amax = tiles.amax(dim=(-3, -1))  # [..., R/16, C/16]
    return tile_amax.repeat_interleave(BLOCK_SIZE, dim=-2)


def _prepare(x: torch.Tensor, block_2d: bool, amax: torch.Tensor | None):
    """Validate, pad, and compute the scale chain (steps 1-4).

    Returns ``(xp, scales, enc_b, amax)``: the FP32 padded input (1-D inputs as one row), the
    E4M3 block scales ``[..., R, Cp/16]`` (padded rows included), their FP32 encode factors,
    and the FP32 tensor amax.
    """
    if not x.is_floating_point():
        raise ValueError(f"NVFP4 quantizes floating-point tensors, got dtype {x.dtype}; cast it first.")
    if x.dim() < (2 if block_2d else 1):
        raise ValueError(
            f"2-D (16x16) NVFP4 blocks need a tensor with at least 2 dimensions, got shape "
            f"{tuple(x.shape)}; use block_2d=False for vectors."
        )
    xf = x.float()
    if xf.dim() == 1:
        xf = xf.unsqueeze(0)
    xp = _pad_to_block(xf, 2 if block_2d else 1)
    mag = xp.abs()  # zero padding never changes an amax
    amax = (mag.amax() if amax is None else amax).float()
    s_enc = global_encode_scale(amax)
    s_dec = 1.0 / s_enc
    block_amax = _block_amax(mag, block_2d)
    one_sixth = torch.tensor(1.0 / 6.0, dtype=torch.float32, device=x.device)
    scales = e4m3_saturating_cast(block_amax * (s_enc * one_sixth))
    enc_b = torch.clamp(1.0 / (scales.float() * s_dec), max=FLT_MAX)
    return xp, scales, enc_b, amax


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """View ``[..., C]`` as ``[..., C/16, 16]``."""
    return t.reshape(*t.shape[:-1], t.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)


@dataclass
class NVFP4Tensor:
    """A tensor stored in NVFP4: packed E2M1 codes, E4M3 block scales, FP32 tensor amax.

    Attributes:
        data: ``uint8`` packed codes, ``[..., R, Cp/2]`` (two codes per byte, even element in
            the low nibble); ``Cp`` is the last dimension padded to a multiple of 16.
        scales: ``float8_e4m3fn`` block decode scales ``[..., R, Cp/16]``, one per 1x16 row
            block (for 2-D tiles the tile's scale is repeated on each of its 16 rows).
        amax: FP32 tensor amax used for the global scale; a scalar, or ``[..., 1, 1]`` when
            each leading index (e.g. each expert) was scaled on its own.
        shape: the original (unpadded) shape.
        block_2d: whether the scales belong to 16x16 tiles.
    """

    data: torch.Tensor
    scales: torch.Tensor
    amax: torch.Tensor
    shape: torch.Size
    block_2d: bool = False

    @property
    def global_encode_scale(self) -> torch.Tensor:
        """``S_enc`` of step 1 (FP32)."""
        return global_encode_scale(self.amax)

    @property
    def global_decode_scale(self) -> torch.Tensor:
        """``S_dec = 1 / S_enc`` (FP32), applied after the GEMM on hardware."""
        return 1.0 / self.global_encode_scale

    def codes(self) -> torch.Tensor:
        """Unpacked ``uint8`` codes ``[..., R, Cp]`` (padded columns included)."""
        return unpack_nibbles(self.data)

    @classmethod
    def quantize(
        cls,
        x: torch.Tensor,
        *,
        block_2d: bool = False,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
        amax: torch.Tensor | None = None,
    ) -> "NVFP4Tensor":
        """Quantize ``x`` (any float dtype, at least 1-D; 2-D blocks need at least 2-D).

        Args:
            x: the high-precision tensor; blocks run along its last dimension.
            block_2d: use 16x16 tiles of the last two dimensions instead of 1x16 blocks.
            stochastic: stochastic rounding of the elements (gradients) instead of RNE.
            generator: random generator for stochastic rounding.
            amax: the tensor amax to derive the global scale from; defaults to
                ``x.abs().max()``. Pass ``x.abs().amax(dim=(-2, -1), keepdim=True)`` to give
                every leading index (expert) its own global scale.
        """
        shape = x.shape
        xp, scales, enc_b, amax = _prepare(x, block_2d, amax)
        scaled = (_blocks(xp) * enc_b.unsqueeze(-1)).reshape(xp.shape)
        codes = e2m1_encode_stochastic(scaled, generator) if stochastic else e2m1_encode_rne(scaled)
        rows = 1 if x.dim() == 1 else x.shape[-2]
        codes, scales = codes[..., :rows, :], scales[..., :rows, :]
        return cls(pack_nibbles(codes), scales, amax, shape, block_2d)

    def dequantize(self, dtype: torch.dtype = torch.float32, *, apply_global_scale: bool = True) -> torch.Tensor:
        """Values ``code * s_b (* S_dec)`` with the original shape, in ``dtype``.

        With ``apply_global_scale=False`` the result is ``code * s_b`` only: these values need
        at most 6 significant bits and are exact in BF16, FP16 and FP32; the FP32 ``S_dec`` is
        then applied to the GEMM output, as the tensor cores do.
        """
        vals = e2m1_decode(self.codes(), torch.float32)
        vals = (_blocks(vals) * self.scales.float().unsqueeze(-1)).reshape(vals.shape)
        if apply_global_scale:
            vals = vals * self.global_decode_scale
        cols = self.shape[-1]
        vals = vals[..., :cols]
        return vals.reshape(self.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    *,
    block_2d: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast emulation path: ``(code * s_b, S_dec)`` without building codes or packing.

    Returns the FP32 block-scaled values with ``x``'s shape (exact in BF16) and the FP32 global
    decode scale; bit-identical to ``NVFP4Tensor.quantize(x, ...).dequantize(
    apply_global_scale=False)`` (tested), with the same random draws for stochastic rounding.
    """
    xp, scales, enc_b, amax = _prepare(x, block_2d, amax)
    sc = scales.float().unsqueeze(-1)
    scaled = _blocks(xp) * enc_b.unsqueeze(-1)
    q = e2m1_round_stochastic(scaled, generator) if stochastic else e2m1_round_rne(scaled)
    local = q.mul_(sc).reshape(xp.shape)
    rows = 1 if x.dim() == 1 else x.shape[-2]
    local = local[..., :rows, : x.shape[-1]].reshape(x.shape)
    return local, 1.0 / global_encode_scale(amax)


def quantize_dequantize(
    x: torch.Tensor,
    *,
    block_2d: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """``NVFP4Tensor.quantize(x, ...).dequantize()`` in ``x``'s dtype: the fake-quant view of ``x``."""
    q = NVFP4Tensor.quantize(x, block_2d=block_2d, stochastic=stochastic, generator=generator, amax=amax)
    return q.dequantize(x.dtype)
