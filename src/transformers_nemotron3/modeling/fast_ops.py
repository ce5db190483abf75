"""Seam for optional fused CPU kernels on few-token steps (no autograd; float32, GEMMs also bfloat16).

``ops`` is None unless the package's ``enable_cpu_kernels()`` plugged the compiled kernels
in; every helper here then returns None (or runs ``F.linear``) so the model's PyTorch paths run.
These are the per-operation kernels (any few-token forward, e.g. speculative verification); whole
decode steps go through `fused_decode`. Copied with the modeling files into saved checkpoints, where
``ops`` simply stays None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ops = None  # torch.ops.nemotron3_cpu when enabled
advise_weights = None  # with the kernels: called with the tensors a decode plan streams (cpu_kernels.hugepages)
MAX_ROWS = 16  # small_linear: at most this many input rows (beyond, MKL's GEMM is as fast)
MAX_MOE_TOKENS = 32  # moe_relu2: at most this many tokens


GEMM_DTYPES = (torch.float32, torch.bfloat16)  # weights the few-row GEMMs stream (fp32 accumulation)


def plain(*tensors: torch.Tensor, dtypes: tuple = (torch.float32,)) -> bool:
    """CPU tensors of one of ``dtypes`` and no autograd graph to build."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in dtypes:
            return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through the few-row CPU kernel when enabled and applicable."""
    if (ops is not None and x.numel() <= MAX_ROWS * weight.shape[-1] and weight.is_contiguous()
            and x.dtype == weight.dtype and plain(x, weight, dtypes=GEMM_DTYPES)):
        return ops.small_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def kernel_ops():
    """The kernels in use (``torch.ops.nemotron3_cpu``), or None when switched off."""
    return ops


def weights_streamed(tensors) -> None:
    """Tell the kernels' side which tensors decode steps will stream (it may back them with huge pages)."""
    if advise_weights is not None:
        advise_weights(tensors)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """RMSNorm with a weight in one pass through the CPU kernel, or None when not applicable."""
    if ops is None or weight is None or not plain(x, weight):
        return None
    return ops.rms_norm(x, weight, eps)


def fused_mamba_step(mixer, zxbcdt: torch.Tensor, A: torch.Tensor, state) -> torch.Tensor | None:
    """A fused Mamba-2 decode step (the gated, normed input of ``out_proj``), or None when not applicable."""
    if ops is None:
        return None
    conv_b = mixer.conv1d.bias
    params = [mixer.conv1d.weight, mixer.dt_bias, mixer.D, mixer.norm.weight, *([conv_b] if conv_b is not None else [])]
    if not (zxbcdt.dtype == state.conv.dtype and plain(zxbcdt, state.conv, *params, dtypes=GEMM_DTYPES)
            and plain(state.ssm)):
        return None
    lo, hi = mixer.time_step_limit
    return ops.mamba_step(zxbcdt, state.conv, mixer.conv1d.weight, conv_b, mixer.dt_bias, A, mixer.D, state.ssm,
                          mixer.norm.weight, mixer.n_groups, mixer.norm.eps, float(lo), float(hi))


def relu2_experts_fit(experts, dtype: torch.dtype) -> bool:
    """The routed experts are what the kernels run: non-gated squared ReLU, CPU weights of ``dtype``."""
    return (experts.gate_proj is None and getattr(experts.act, "__name__", "") == "_relu2"
            and experts.up_proj.dtype == experts.down_proj.dtype == dtype and experts.up_proj.device.type == "cpu")


def fused_moe_relu2_applies(experts, x: torch.Tensor) -> bool:
    """Whether `fused_moe_relu2` can run these routed experts on these tokens."""
    return (ops is not None and x.shape[0] <= MAX_MOE_TOKENS and relu2_experts_fit(experts, x.dtype)
            and plain(x, experts.up_proj, experts.down_proj, dtypes=GEMM_DTYPES))


def fused_moe_relu2(experts, x: torch.Tensor, weights: torch.Tensor, topk_idx: torch.Tensor,
              acc: torch.Tensor) -> torch.Tensor:
    """``acc [T, width] += sum_j weights[:, j] * expert_{topk_idx[:, j]}(x)`` in place (check `fused_moe_relu2_applies`)."""
    return ops.moe_relu2(x, experts.up_proj, experts.down_proj, topk_idx, weights.float(), acc)


__all__ = [
    "linear", "plain", "kernel_ops", "fused_rms_norm", "fused_mamba_step", "fused_moe_relu2",
    "fused_moe_relu2_applies", "relu2_experts_fit", "ops", "MAX_ROWS", "MAX_MOE_TOKENS", "GEMM_DTYPES", "weights_streamed",
]
