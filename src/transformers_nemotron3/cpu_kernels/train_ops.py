"""Whole-sequence CPU kernels (training and prefill) for the model's seams, with autograd.

- `cpu_conv_silu` (the ``conv_silu`` hook `CpuMamba2SequenceMixer` hands to `mamba2.conv_scan`): the depthwise
  causal conv + SiLU in one pass forward (``conv_silu``) and one backward (``conv_silu_backward``, which
  recomputes the pre-activation instead of keeping it);
- `cpu_gated_rms_norm` (the ``kernel`` seam of `mamba2.GatedRMSNorm`): ``rmsnorm(y * silu(z)) * weight`` per
  group in one pass each way, keeping one inverse RMS per row and group; `cpu_rms_norm` (the ``kernel`` seam of
  `blocks.Nemotron3RMSNorm`): the same kernel without the gate, over the whole row;
- `cpu_relu2` (the ``act`` / ``act_fn`` of relu^2 MLPs and experts): one pass each way (the PyTorch form is two
  passes forward and three backward).

float32 CPU tensors only (anything else returns None, or for relu^2 the model's own function, and the PyTorch
ops run). With autograd the kernels run
inside `torch.autograd.Function` s whose backward is the kernels' own; without it the forward op alone runs.
Values and gradients equal the PyTorch paths up to summation order (``modeling_tests/test_cpu_train_kernels.py``).
"""

from __future__ import annotations

import torch

from ..modeling.moe import _relu2
from . import build

MAX_TAPS = 16  # conv kernel widths the kernel takes


def _plain_f32(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _ConvSilu(torch.autograd.Function):
    """``silu(depthwise causal conv(x) + bias)`` through ``conv_silu`` / ``conv_silu_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx):
        ops = build.kernel_ops()
        weight_t = weight.flip(-1).t().contiguous()  # [k, channels], row j multiplies the input j tokens back
        ctx.save_for_backward(x, weight_t, bias, seq_idx)
        return ops.conv_silu(x, weight_t, bias, seq_idx)

    @staticmethod
    def backward(ctx, grad):
        x, weight_t, bias, seq_idx = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        gx, gw_t, gb = build.kernel_ops().conv_silu_backward(grad, x, weight_t, bias, seq_idx)
        return gx, gw_t.t().flip(-1), (gb if bias is not None else None), None


def cpu_conv_silu(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """The ``conv_silu`` hook of `mamba2.conv_scan`: xbc [b, l, channels] (rows may be strided), weight
    [channels, k], bias [channels] or None, seq_idx [b, l] or None -> ``silu(conv)`` [b, l, channels], or None
    where the kernel does not apply (not float32 on CPU, no kernels, a wider conv)."""
    if (build.kernel_ops() is None or not _plain_f32(xbc, weight, bias) or xbc.dim() != 3
            or xbc.stride(-1) != 1 or weight.shape[-1] > MAX_TAPS):
        return None
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.long).contiguous()
    if _needs_grad(xbc, weight, bias):
        return _ConvSilu.apply(xbc, weight, bias, seq_idx)
    return build.kernel_ops().conv_silu(xbc, weight.flip(-1).t().contiguous(), bias, seq_idx)


class _GatedRMSNorm(torch.autograd.Function):
    """`GatedRMSNorm` (or, with ``z`` None, `Nemotron3RMSNorm`) on [rows, d] views through ``gated_rms_norm`` /
    ``gated_rms_norm_backward``."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):
        out, inv = build.kernel_ops().gated_rms_norm(y, z, weight, group_size, eps)
        ctx.save_for_backward(y, z, weight, inv)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, grad):
        y, z, weight, inv = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        gy, gz, gw = build.kernel_ops().gated_rms_norm_backward(grad, y, z, weight, inv, ctx.group_size)
        return gy, (gz if z is not None else None), gw, None, None


def _norm(y2: torch.Tensor, z2: torch.Tensor | None, weight: torch.Tensor, group_size: int, eps: float):
    if _needs_grad(y2, z2, weight):
        return _GatedRMSNorm.apply(y2, z2, weight, group_size, eps)
    return build.kernel_ops().gated_rms_norm(y2, z2, weight, group_size, eps)[0]


def cpu_gated_rms_norm(norm, y: torch.Tensor, z: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor | None:
    """The ``kernel`` seam of `mamba2.GatedRMSNorm`: the norm's result for y, z [..., d], or None where the kernel
    does not apply (not float32 on CPU, no kernels)."""
    weight = norm.weight
    if build.kernel_ops() is None or out_dtype != torch.float32 or not _plain_f32(y, z, weight):
        return None
    shape = y.shape
    y2, z2 = y.reshape(-1, shape[-1]), z.reshape(-1, shape[-1])
    if y2.stride(-1) != 1 or z2.stride(-1) != 1:
        return None
    return _norm(y2, z2, weight, norm.group_size, norm.eps).view(shape)


def cpu_rms_norm(norm, x: torch.Tensor) -> torch.Tensor | None:
    """The ``kernel`` seam of `blocks.Nemotron3RMSNorm`: its result for x [..., d], or None where the kernel does not
    apply (not float32 on CPU, no kernels)."""
    weight = norm.weight
    if build.kernel_ops() is None or not _plain_f32(x, weight):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        return None
    return _norm(x2, None, weight, x.shape[-1], norm.eps).view(x.shape)


class _Relu2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return build.kernel_ops().relu2(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return build.kernel_ops().relu2_backward(grad.contiguous(), x)


def cpu_relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU through ``relu2`` / ``relu2_backward`` under autograd (float32 CPU); otherwise the model's own
    `moe._relu2` (without autograd it runs in place, which no kernel beats)."""
    if build.kernel_ops() is not None and _needs_grad(x) and _plain_f32(x) and x.is_contiguous():
        return _Relu2.apply(x)
    return _relu2(x)


RELU2 = (_relu2, cpu_relu2)  # the squared-ReLU activations (the decode kernels run relu^2 MLPs with either)


__all__ = ["cpu_conv_silu", "cpu_gated_rms_norm", "cpu_rms_norm", "cpu_relu2", "RELU2", "MAX_TAPS"]
