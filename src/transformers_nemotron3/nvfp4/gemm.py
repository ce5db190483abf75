"""The three NVFP4 GEMMs of a linear layer, emulated exactly.

For ``y = x W^T`` (``x`` [T, K], ``W`` [N, K], ``dy`` [T, N]) the published recipe
(NVIDIA's NVFP4 pretraining paper = Transformer Engine ``NVFP4BlockScaling()`` defaults) is:

========  ==========================  ============  ========  ===
GEMM      operands, blocks along ...   block         rounding  RHT
========  ==========================  ============  ========  ===
Fprop     x (K), W (K)                 1x16, 16x16   RNE       no
Dgrad     dy (N), W^T (N)              1x16, 16x16   SR, RNE   no
Wgrad     dy^T (T), x^T (T)            1x16, 1x16    SR, RNE   yes
========  ==========================  ============  ========  ===

Emulation: each operand is quantized to NVFP4 and dequantized *without* its FP32 global
scale (those values are exact in BF16/FP32), multiplied in FP32, and the product is scaled by
``S_dec(a) * S_dec(b)`` -- the order the Blackwell tensor cores use. Only the accumulation
order differs from hardware. Every piece can be switched off through :class:`NVFP4GemmConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .format import BLOCK_SIZE
from .hadamard import TE_WGRAD_SIGNS, random_hadamard_transform
from .quantize import NVFP4Tensor, fake_quantize


@dataclass(frozen=True)
class NVFP4GemmConfig:
    """Which parts of the NVFP4 recipe a quantized GEMM applies (defaults = published recipe).

    Attributes:
        fprop: quantize the forward GEMM (x and W).
        dgrad: quantize the input-gradient GEMM (dY and W^T).
        wgrad: quantize the weight-gradient GEMM (dY^T and X^T).
        weight_2d: 16x16 weight blocks (W and W^T share codes); else 1x16 along each GEMM's
            reduction dimension.
        wgrad_rht: 16-point random Hadamard transform on both Wgrad operands.
        stochastic_rounding: stochastic rounding of gradients (dY in Dgrad and Wgrad).
        rht_bf16: round the RHT input/output to BF16 as Transformer Engine does.
        rht_signs: the RHT sign vector (Transformer Engine's by default).
        gemm_dtype: operand dtype of the emulated GEMMs. ``torch.float32`` (default) sums in
            FP32 and returns FP32, the reference behaviour. ``torch.bfloat16`` feeds the
            (exactly representable) block-scaled operands to a BF16 GEMM -- much faster on
            GPUs without FP4 tensor cores -- whose output is rounded to BF16 before the FP32
            global scales are applied, like a tensor-core GEMM writing BF16.
    """

    fprop: bool = True
    dgrad: bool = True
    wgrad: bool = True
    weight_2d: bool = True
    wgrad_rht: bool = True
    stochastic_rounding: bool = True
    rht_bf16: bool = True
    rht_signs: tuple[int, ...] = TE_WGRAD_SIGNS
    gemm_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.gemm_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"gemm_dtype={self.gemm_dtype} is not supported; use torch.float32 or torch.bfloat16.")

    def with_bf16(self, which: str = "all") -> "NVFP4GemmConfig":
        """A copy with GEMMs returned to high precision: ``"all"``, ``"forward"`` (Fprop only)
        or ``"backward"`` (Dgrad and Wgrad)."""
        if which == "all":
            return replace(self, fprop=False, dgrad=False, wgrad=False)
        if which == "forward":
            return replace(self, fprop=False)
        if which == "backward":
            return replace(self, dgrad=False, wgrad=False)
        raise ValueError(f"which={which!r} is not one of 'all', 'forward', 'backward'.")

    @property
    def any_enabled(self) -> bool:
        """True when at least one of the three GEMMs is quantized."""
        return self.fprop or self.dgrad or self.wgrad


def _local(q: NVFP4Tensor) -> torch.Tensor:
    return q.dequantize(torch.float32, apply_global_scale=False)


def nvfp4_matmul_nt(a: NVFP4Tensor, b: NVFP4Tensor) -> torch.Tensor:
    """``a @ b^T`` of two NVFP4 tensors blocked along their shared last dimension (FP32).

    ``a`` is [M, K] (or [K] padded shape), ``b`` is [N, K]; the block-scaled products are
    summed in FP32 and the result is multiplied by ``S_dec(a) * S_dec(b)``.
    """
    alpha = a.global_decode_scale * b.global_decode_scale
    return (_local(a) @ _local(b).T) * alpha


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the first dimension of a 2-D tensor to a multiple of 16 (token padding)."""
    extra = (-x.shape[0]) % BLOCK_SIZE
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def _qmm_nt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ b^T`` of two :func:`fake_quantize` results, global scales applied after the GEMM."""
    (la, sa), (lb, sb) = a, b
    if dtype != torch.float32:
        return (la.to(dtype) @ lb.to(dtype).T).float() * (sa * sb)
    return (la @ lb.T) * (sa * sb)


QuantizedOperand = tuple[torch.Tensor, torch.Tensor]
"""``(code * block scale, global decode scale)`` as returned by :func:`fake_quantize`."""


def quantize_weight(w: torch.Tensor, cfg: NVFP4GemmConfig) -> QuantizedOperand:
    """The weight as Fprop sees it: 16x16 (or 1x16 along K) blocks, RNE."""
    return fake_quantize(w, block_2d=cfg.weight_2d)


def fprop(x2: torch.Tensor, w: torch.Tensor, cfg: NVFP4GemmConfig, wq: QuantizedOperand | None = None) -> torch.Tensor:
    """``x2 @ w^T`` in FP32 ([T, K] x [N, K] -> [T, N]), quantized when ``cfg.fprop``.

    ``wq`` is a precomputed :func:`quantize_weight` result (reused by Dgrad).
    """
    if not cfg.fprop:
        return x2.float() @ w.float().T
    return _qmm_nt(fake_quantize(x2), wq if wq is not None else quantize_weight(w, cfg), cfg.gemm_dtype)


def dgrad(
    dy2: torch.Tensor,
    w: torch.Tensor,
    cfg: NVFP4GemmConfig,
    generator: torch.Generator | None = None,
    wq: QuantizedOperand | None = None,
) -> torch.Tensor:
    """``dy2 @ w`` in FP32 ([T, N] x [N, K] -> [T, K]), quantized when ``cfg.dgrad``.

    W^T is blocked along N. With 2-D blocks its codes are the transpose of the Fprop codes,
    so a Fprop ``wq`` (from :func:`quantize_weight`) is reused instead of re-quantizing.
    """
    if not cfg.dgrad:
        return dy2.float() @ w.float()
    dyq = fake_quantize(dy2, stochastic=cfg.stochastic_rounding, generator=generator)
    if cfg.weight_2d and wq is not None:
        wtq = (wq[0].T.contiguous(), wq[1])
    else:
        wtq = fake_quantize(w.T, block_2d=cfg.weight_2d)
    return _qmm_nt(dyq, wtq, cfg.gemm_dtype)


def wgrad(
    dy2: torch.Tensor, x2: torch.Tensor, cfg: NVFP4GemmConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``dy2^T @ x2`` in FP32 ([T, N] x [T, K] -> [N, K]), quantized when ``cfg.wgrad``.

    Both operands are blocked along the token dimension T (zero-padded to a multiple of 16),
    rotated by the RHT first when ``cfg.wgrad_rht``; dY^T uses stochastic rounding.
    """
    if not cfg.wgrad:
        return dy2.float().T @ x2.float()
    dyt = _pad_rows(dy2.float()).T
    xt = _pad_rows(x2.float()).T
    if cfg.wgrad_rht:
        dyt = random_hadamard_transform(dyt, signs=cfg.rht_signs, bf16=cfg.rht_bf16)
        xt = random_hadamard_transform(xt, signs=cfg.rht_signs, bf16=cfg.rht_bf16)
    dyq = fake_quantize(dyt, stochastic=cfg.stochastic_rounding, generator=generator)
    return _qmm_nt(dyq, fake_quantize(xt), cfg.gemm_dtype)
