"""NVFP4 grouped expert GEMM for the MoE experts' ``gemm`` seam.

The experts module calls ``gemm(x, weight, counts) -> out`` with ``x`` [T, in] tokens sorted
by expert, ``weight`` [E, out, in] and ``counts`` [E] tokens per expert. Each expert's slice is
one linear layer ``x_e @ W_e^T`` and gets the full recipe of :mod:`.gemm` on its own: its own
global scales (per expert weight, per expert token group, like Transformer Engine's split
quantization), 16x16 weight blocks, RHT + stochastic rounding on its weight gradient, with
tokens zero-padded to a multiple of 16 per group for Wgrad.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .gemm import NVFP4GemmConfig, dgrad, fprop, quantize_weight, wgrad


def grouped_mm_reference(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch grouped GEMM: rows of group ``e`` are multiplied by ``weight[e]^T``."""
    _check(x, weight, counts)
    outs = [xe @ we.T for xe, we in zip(torch.split(x, counts.tolist()), weight)]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


def _check(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> None:
    if weight.dim() != 3:
        raise ValueError(f"grouped GEMM weight must be [E, out, in], got shape {tuple(weight.shape)}.")
    if counts.dim() != 1 or counts.numel() != weight.shape[0]:
        raise ValueError(
            f"counts must be 1-D with one entry per expert ({weight.shape[0]}), got shape {tuple(counts.shape)}."
        )
    if x.dim() != 2 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"x must be [T, {weight.shape[2]}] to match weight {tuple(weight.shape)}, got {tuple(x.shape)}.")
    total = int(counts.sum())
    if total != x.shape[0]:
        raise ValueError(f"counts sum to {total} but x has {x.shape[0]} rows; counts must partition the tokens.")


class NVFP4GroupedMMFunction(torch.autograd.Function):
    """Autograd function: per-expert NVFP4 Fprop, Dgrad and Wgrad."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                cfg: NVFP4GemmConfig, generator: torch.Generator | None) -> torch.Tensor:
        sizes = counts.tolist()
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        reuse = cfg.fprop and cfg.dgrad and cfg.weight_2d
        with torch.autocast(x.device.type, enabled=False):
            # Per-expert weight quantization, kept for Dgrad (W^T has the same 2-D codes).
            wq = [quantize_weight(we, cfg) if (reuse and n > 0) else None for we, n in zip(weight, sizes)]
            outs = [fprop(xe, we, cfg, q) for xe, we, q, n in zip(torch.split(x, sizes), weight, wq, sizes) if n > 0]
        saved_q = [t for q in wq if q is not None for t in q]
        ctx.save_for_backward(x, weight, *saved_q)
        ctx.wq_present = [q is not None for q in wq]
        ctx.sizes, ctx.cfg, ctx.generator = sizes, cfg, generator
        out = torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1], dtype=torch.float32)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):  # type: ignore[override]
        x, weight, *flat_q = ctx.saved_tensors
        cfg, sizes, gen = ctx.cfg, ctx.sizes, ctx.generator
        it = iter(flat_q)
        wq = [(next(it), next(it)) if present else None for present in ctx.wq_present]
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            pieces = list(zip(torch.split(x, sizes), torch.split(dy, sizes), weight, sizes))
            if ctx.needs_input_grad[0]:
                dxs = [dgrad(dye, we, cfg, gen, q) for (xe, dye, we, n), q in zip(pieces, wq) if n > 0]
                dx = (torch.cat(dxs) if dxs else torch.zeros_like(x, dtype=torch.float32)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                dw = torch.stack([
                    wgrad(dye, xe, cfg, gen) if n > 0 else torch.zeros_like(we, dtype=torch.float32)
                    for xe, dye, we, n in pieces
                ]).to(weight.dtype)
        return dx, dw, None, None, None


class NVFP4GroupedGemm:
    """Callable for ``experts.gemm``: ``gemm(x, weight, counts) -> out`` in NVFP4 emulation.

    Attributes:
        config: which GEMMs/recipe parts are quantized; set ``config.any_enabled`` false (e.g.
            via :func:`~.plugin.switch_to_bf16`) to fall back to :func:`grouped_mm_reference`.
        generator: optional random generator for stochastic rounding.
        fallback: the high-precision grouped GEMM used when every GEMM is switched off (the
            module's original ``gemm``, so that a switched model is bit-identical to an
            unconverted one); :func:`grouped_mm_reference` by default.
    """

    def __init__(self, config: NVFP4GemmConfig | None = None, generator: torch.Generator | None = None,
                 fallback: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.config = config or NVFP4GemmConfig()
        self.generator = generator
        self.fallback = fallback or grouped_mm_reference

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        _check(x, weight, counts)
        if not self.config.any_enabled:
            return self.fallback(x, weight, counts)
        return NVFP4GroupedMMFunction.apply(x, weight, counts, self.config, self.generator)

    def __repr__(self) -> str:
        return f"NVFP4GroupedGemm({self.config})"


def nvfp4_grouped_mm(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, config: NVFP4GemmConfig | None = None
) -> torch.Tensor:
    """Functional form of :class:`NVFP4GroupedGemm` (the published recipe by default)."""
    return NVFP4GroupedGemm(config)(x, weight, counts)
