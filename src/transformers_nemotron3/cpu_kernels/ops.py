"""Per-operation CPU kernels, plugged into the model's own seams for one model at a time.

- ``"nemotron3_cpu"`` experts implementation (registered in transformers' ``ExpertsInterface``; a model uses
  it when its ``config._experts_implementation`` says so): the routed squared-ReLU experts of a few tokens
  in one ``moe_relu2`` call (grouped by expert, each weight row streamed once). Anything else (many tokens,
  autograd, SwiGLU experts, a plugin's dispatcher or GEMM) runs the experts' own eager forward.
- `CpuMamba2SequenceMixer` (the mixer's ``sequence_mixer`` seam): a cached decode step's conv + SSD update in
  one ``mamba_step`` call; for whole sequences (prefill, training) the default seam with the conv + SiLU
  kernel of `train_ops`.

The decode kernels run only without autograd, on CPU, in float32 or bfloat16, and equal the PyTorch paths up to
summation order (``modeling_tests/test_cpu_kernels.py``). Whole decode steps go through `decoder.CpuDecoder`;
the whole-sequence kernels (with their backward) are in `train_ops`.
"""

from __future__ import annotations

import torch

from ..modeling.mamba2 import Mamba2SequenceMixer, Mamba2Weights
from ..modeling.moe import Nemotron3Experts, grouped_mm, LocalDispatcher
from . import build
from .train_ops import RELU2, cpu_conv_silu

EXPERTS_IMPLEMENTATION = "nemotron3_cpu"
MAX_ROWS = 16  # whole decode steps: at most this many tokens (beyond, MKL's GEMMs are as fast)
MAX_MOE_TOKENS = 32  # moe_relu2: at most this many tokens
GEMM_DTYPES = (torch.float32, torch.bfloat16)  # weights the few-row GEMMs stream (fp32 accumulation)


def plain(*tensors: torch.Tensor, dtypes: tuple = (torch.float32,)) -> bool:
    """CPU tensors of one of ``dtypes`` and no autograd graph to build."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in dtypes:
            return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def relu2_experts_fit(experts, dtype: torch.dtype) -> bool:
    """The routed experts are what the kernels run: this package's non-gated squared-ReLU experts with the
    default dispatcher and GEMM (no plugin), CPU weights of ``dtype``."""
    return (type(experts) is Nemotron3Experts and experts.gate_proj is None
            and experts.act in RELU2 and experts.gemm is grouped_mm
            and type(experts.dispatcher) is LocalDispatcher
            and experts.up_proj.dtype == experts.down_proj.dtype == dtype and experts.up_proj.device.type == "cpu")


def cpu_experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"nemotron3_cpu"`` experts implementation: same contract as `Nemotron3Experts.forward` (float32
    [T, width] weighted sum), through ``moe_relu2`` where it applies, else the eager forward."""
    ops = build.kernel_ops()
    if (ops is not None and hidden_states.shape[0] <= MAX_MOE_TOKENS
            and relu2_experts_fit(experts, hidden_states.dtype)
            and plain(hidden_states, experts.up_proj, experts.down_proj, dtypes=GEMM_DTYPES)):
        acc = hidden_states.new_zeros(hidden_states.shape[0], hidden_states.shape[1], dtype=torch.float32)
        return ops.moe_relu2(hidden_states.contiguous(), experts.up_proj, experts.down_proj, top_k_index,
                             top_k_weights.float(), acc)
    return type(experts).forward.__wrapped__(experts, hidden_states, top_k_index, top_k_weights)


cpu_experts_forward.keeps_seams = True  # falls back to the eager forward, so plugins' dispatchers / GEMMs still run


def register_experts_implementation() -> None:
    """Make ``"nemotron3_cpu"`` a valid ``experts_implementation`` (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, cpu_experts_forward)


class CpuMamba2SequenceMixer(Mamba2SequenceMixer):
    """The default sequence-mixer seam, with cached decode steps through the ``mamba_step`` kernel and whole
    sequences' conv + SiLU (training, prefill) through ``conv_silu`` (`train_ops.cpu_conv_silu`)."""

    conv_silu = staticmethod(cpu_conv_silu)

    @staticmethod
    def steps(mixer, w: Mamba2Weights, xbc, dt, state) -> torch.Tensor:
        ops = build.kernel_ops()
        conv_b = w.conv_bias
        params = [w.conv_weight, w.dt_bias, w.D, *([conv_b] if conv_b is not None else [])]
        if (ops is None or xbc.dtype != state.conv.dtype or not plain(xbc, dt, state.conv, *params, dtypes=GEMM_DTYPES)
                or not plain(state.ssm)):
            return Mamba2SequenceMixer.steps(mixer, w, xbc, dt, state)
        lo, hi = mixer.time_step_limit
        ys = []
        for t in range(xbc.shape[1]):
            step_in = torch.cat([xbc[:, t], dt[:, t]], dim=-1)  # (x B C | dt), as in_proj laid them out
            ys.append(ops.mamba_step(step_in, state.conv, w.conv_weight, conv_b, w.dt_bias, w.A, w.D, state.ssm,
                                     None, w.n_groups, 0.0, float(lo), float(hi))[:, None])
            state.seen += 1
            if state.history is not None:
                state.record()
        return torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]


__all__ = ["EXPERTS_IMPLEMENTATION", "cpu_experts_forward", "register_experts_implementation",
           "CpuMamba2SequenceMixer", "plain", "relu2_experts_fit", "MAX_ROWS", "MAX_MOE_TOKENS", "GEMM_DTYPES"]
