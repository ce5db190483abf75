"""Decode plans: a model's blocks bound once per cache for ``nemotron3_cpu.decode_step`` (one call per token).

At batch 1 a decode step of a small model spends about as long in Python and in small ATen ops (module
calls, argument checks, casts, a dozen ops per block, each starting with cold caches after the weights
streamed through) as in the kernels. A `DecodePlan` binds a model's parameters once per cache and hands
them, with the cache's current states, to one C++ call that runs the embedding lookup, every block, the
final norm and the LM head (cpu_kernels/decode_blocks.cpp, same order and roundings as the modules).

Blocks the kernels cover (`block_plan` looks the mixer's exact class up in `BUILDERS`, and each builder checks
its conditions): Mamba-2 with the default sequence mixer; plain sdpa attention (no mask, RoPE or q/k norm); MoE
with the default router, dispatcher and GEMM, non-gated relu^2 experts at full width and a relu^2 or no shared
expert; dense relu^2 MLP. Any other block (a new block kind, a subclass, a plugin's replacement) makes
`cached_plan` return None, and the model runs its modules. Lives outside ``modeling/``: saved remote code
does not carry it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.attention import Nemotron3Attention
from ..modeling.blocks import Nemotron3RMSNorm
from ..modeling.cache import AttentionLayer, Nemotron3HybridCache
from ..modeling.mamba2 import Mamba2SequenceMixer, Nemotron3Mamba2Mixer
from ..modeling.moe import Nemotron3MLP, Nemotron3MoE, Nemotron3Router, experts_implementation, keeps_seams
from . import build
from .ops import GEMM_DTYPES, MAX_ROWS, CpuMamba2SequenceMixer, relu2_experts_fit
from .train_ops import RELU2


def decode_ready(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a cached step may run through the fused block kernels: kernels on, no autograd or autocast,
    ``x`` ([b, T] ids or [b, T, hidden] states) on CPU with at most ``MAX_ROWS`` tokens in all, model
    ``dtype`` float32 or bfloat16. (Steps of T > 1 also need `DecodePlan.applies`.)"""
    return (build.kernel_ops() is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and dtype in GEMM_DTYPES and x.shape[0] * x.shape[1] <= MAX_ROWS
            and not torch.is_autocast_enabled("cpu"))


def fits(dtype: torch.dtype, *linears: nn.Module) -> bool:
    """``linears`` are plain ``nn.Linear`` (not LoRA-wrapped, quantized or converted) with CPU weights of ``dtype``."""
    for m in linears:
        if type(m) is not nn.Linear or type(m.weight) is not nn.Parameter or m.weight.dtype != dtype \
                or m.weight.device.type != "cpu":
            return False
    return True


class FusedBlock:
    """One block's part of a decode plan: what ``nemotron3_cpu.decode_step`` needs to run ``h + mixer(norm(h))``
    for one token per sequence (argument layout in cpu_kernels/decode_blocks.cpp). Parameters are bound when
    it is built; cache states are read at every step (rollback, beam reordering and growth replace them)."""

    __slots__ = ("kind", "tensors", "floats", "ints", "state", "moe")
    MAMBA, ATTENTION, MOE, MLP = 0, 1, 2, 3

    def __init__(self, kind: int, tensors: list, floats: list, ints: list, state=None, moe=None) -> None:
        self.kind, self.tensors, self.floats, self.ints, self.state, self.moe = kind, tensors, floats, ints, state, moe


def mamba_block(norm: nn.Module, mixer: nn.Module, state) -> FusedBlock:
    """A Mamba-2 block; ``state`` is the layer's `cache.MambaLayer`."""
    lo, hi = mixer.time_step_limit
    return FusedBlock(FusedBlock.MAMBA, [
        norm.weight, mixer.in_proj.weight, mixer.in_proj.bias, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias,
        mixer.A_log, mixer.D, mixer.norm.weight, mixer.out_proj.weight, mixer.out_proj.bias,
    ], [float(norm.eps), float(mixer.norm.eps), float(lo), float(hi)], [int(mixer.n_groups)], state=state)


def attention_block(norm: nn.Module, attn: nn.Module, state) -> FusedBlock:
    """An attention block (plain sdpa, no mask); ``state`` is the layer's `cache.AttentionLayer`, one longer per step."""
    return FusedBlock(FusedBlock.ATTENTION, [
        norm.weight, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias, attn.v_proj.weight,
        attn.v_proj.bias, attn.o_proj.weight, attn.o_proj.bias,
    ], [float(norm.eps), float(attn.scaling)], [int(attn.num_heads), int(attn.head_dim)], state=state)


SCORE_FUNCTIONS = {"sigmoid": 0, "softmax": 1, "topk_softmax": 2}  # decode_step's router score codes


def moe_block(norm: nn.Module, moe: nn.Module) -> FusedBlock:
    """A MoE block; each step sets ``moe.last_router_logits`` as its forward does."""
    gate, shared, experts = moe.gate, moe.shared_experts, moe.experts
    shared_args = ([shared.up_proj.weight, shared.up_proj.bias, shared.down_proj.weight, shared.down_proj.bias]
                   if shared is not None else [None, None, None, None])
    fc1, fc2 = moe.fc1_latent_proj, moe.fc2_latent_proj
    latent_args = [fc1.weight, fc1.bias, fc2.weight, fc2.bias] if fc1 is not None else [None, None, None, None]
    return FusedBlock(FusedBlock.MOE, [
        norm.weight, gate.weight, gate.e_score_correction_bias, *shared_args, *latent_args, experts.up_proj,
        experts.down_proj,
    ], [float(norm.eps), float(gate.scaling)], [
        SCORE_FUNCTIONS[gate.score_function], int(gate.top_k), int(gate.n_group), int(gate.topk_group),
        int(bool(gate.norm_topk_prob)),
    ], moe=moe)


def mlp_block(norm: nn.Module, mlp: nn.Module) -> FusedBlock:
    """A dense relu^2 MLP block."""
    return FusedBlock(FusedBlock.MLP, [norm.weight, mlp.up_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight,
                                       mlp.down_proj.bias], [float(norm.eps)], [])


class DecodePlan:
    """Fused blocks run back to back by one ``nemotron3_cpu.decode_step`` call per decode step."""

    def __init__(self, blocks: list[FusedBlock]) -> None:
        self.op = build.kernel_ops().decode_step.default
        self.kinds = [b.kind for b in blocks]
        self.tensors = [t for b in blocks for t in b.tensors]
        self.floats = [f for b in blocks for f in b.floats]
        self.ints = [i for b in blocks for i in b.ints]
        self.stateful = [(b.kind == FusedBlock.MAMBA, b.state) for b in blocks if b.state is not None]
        self.kv = [b.state for b in blocks if b.kind == FusedBlock.ATTENTION]
        self.moe_attrs = [b.moe.__dict__ for b in blocks if b.kind == FusedBlock.MOE]
        for b in blocks:
            if b.moe is not None:
                b.moe.last_aux_loss = None

    def run(self, h: torch.Tensor, input_ids: torch.Tensor | None = None, final_norm: nn.Module | None = None,
            lm_head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One step of T tokens per sequence (T > 1 only to verify drafts while the Mamba states record, or
        without Mamba blocks): ``h`` [b, T, hidden] (or, with ``input_ids`` [b, T], the embedding matrix) ->
        (hidden after the blocks, after ``final_norm`` or None, fp32 logits of ``lm_head`` or None)."""
        tokens = (input_ids if input_ids is not None else h).shape[1]
        states, lengths, mamba = [], [], []
        for is_mamba, st in self.stateful:  # in layer order, as the op reads them
            if is_mamba:
                states += (st.conv, st.ssm)
                mamba.append(st)
            else:
                st.reserve(st.length + tokens)  # room for this step's keys/values (may move the buffers)
                states += (st.key_buffer, st.value_buffer)
                lengths.append(st.length)
        record = tokens > 1 and bool(mamba)
        out, normed, logits, routers, recorded = self.op(
            h, input_ids, self.kinds, self.tensors, self.floats, self.ints, states, lengths,
            final_norm.weight if final_norm is not None else None,
            float(final_norm.eps) if final_norm is not None else 0.0,
            lm_head.weight if lm_head is not None else None, record)
        for st in self.kv:
            st.length += tokens
        for st in mamba:
            st.seen += tokens
        for attrs, r in zip(self.moe_attrs, routers):
            attrs["last_router_logits"] = r  # a plain attribute: skip nn.Module.__setattr__ on the hot path
        if record:  # per Mamba layer, per token: (conv, ssm) after that token, as the modules record them
            for i, st in enumerate(mamba):
                chunk = recorded[2 * tokens * i : 2 * tokens * (i + 1)]
                st.history.extend(zip(chunk[0::2], chunk[1::2]))
        return out, (normed[0] if normed else None), (logits[0] if logits else None)

    def applies(self, tokens: int) -> bool:
        """Whether a step of ``tokens`` per sequence matches the modules: one token, or several while every
        Mamba state records (speculative verification: the modules then step token by token too)."""
        return tokens == 1 or all(st.history is not None for is_mamba, st in self.stateful if is_mamba)


def cached_plan(owner: nn.Module, layers, cache, dtype: torch.dtype, extra: tuple = (), on_new_plan=None
                ) -> DecodePlan | None:
    """The fused plan of ``layers`` (blocks of ``owner``) for this cache, built at first use and kept with the
    cache while the kernels and dtype stay the same; None when a block is not covered. A None found before the
    layers' cache states exist (prefill not done yet) is not kept. ``on_new_plan`` is called with the tensors a
    new plan streams (its weights and ``extra``, e.g. the LM head)."""
    ops = build.kernel_ops()
    entry = cache.decode_plans.get(owner)
    if entry is not None and entry[0] is ops and entry[1] == dtype:
        return entry[2]
    blocks = [block_plan(layer, cache, dtype) for layer in layers]
    plan = DecodePlan(blocks) if all(b is not None for b in blocks) else None
    if plan is not None or all(_state_ready(cache.get(layer.layer_idx)) for layer in layers):
        cache.decode_plans[owner] = (ops, dtype, plan)
    if plan is not None and on_new_plan is not None:
        on_new_plan([*plan.tensors, *extra])
    return plan


def _mamba(norm, mixer, cache, dtype):
    state = cache.get(mixer.layer_idx) if isinstance(cache, Nemotron3HybridCache) else None
    if (type(mixer.sequence_mixer) not in (Mamba2SequenceMixer, CpuMamba2SequenceMixer) or state is None
            or not state.has_previous or state.conv.dtype != dtype or state.ssm.dtype != torch.float32
            or not fits(dtype, mixer.in_proj, mixer.out_proj)):
        return None
    return mamba_block(norm, mixer, state)


def _attention(norm, attn, cache, dtype):
    state = cache.get(attn.layer_idx) if cache is not None else None
    impl = getattr(attn.config, "_attn_implementation", None) or "sdpa"
    if (not isinstance(state, AttentionLayer) or state.key_buffer is None or impl != "sdpa" or attn.use_rope
            or attn.use_qk_norm or attn.training or state.key_buffer.dtype != dtype
            or not fits(dtype, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        return None
    return attention_block(norm, attn, state)


def _moe(norm, moe, cache, dtype):
    shared, gate, experts = moe.shared_experts, moe.gate, moe.experts
    latent = [moe.fc1_latent_proj, moe.fc2_latent_proj] if moe.fc1_latent_proj is not None else []
    if (moe.training or (latent and not fits(dtype, *latent)) or type(gate) is not Nemotron3Router
            or gate.score_function not in SCORE_FUNCTIONS or not keeps_seams(experts_implementation(experts))
            or not relu2_experts_fit(experts, dtype)
            or (shared is not None and not (type(shared) is Nemotron3MLP and shared.act in RELU2
                                            and fits(dtype, shared.up_proj, shared.down_proj)))):
        return None
    return moe_block(norm, moe)


def _mlp(norm, mlp, cache, dtype):
    if mlp.act in RELU2 and fits(dtype, mlp.up_proj, mlp.down_proj):
        return mlp_block(norm, mlp)
    return None


BUILDERS = {Nemotron3Mamba2Mixer: _mamba, Nemotron3Attention: _attention, Nemotron3MoE: _moe, Nemotron3MLP: _mlp}
"""Mixer class (exact) -> builder ``(norm, mixer, cache, dtype) -> FusedBlock | None``. A block kind without an
entry here runs its module; covering it in the fused step means a builder here and a case in decode_blocks.cpp."""


def block_plan(layer: nn.Module, cache, dtype: torch.dtype) -> FusedBlock | None:
    """One block (``h + mixer(norm(h))``) as a `FusedBlock`, or None where the kernels do not cover it."""
    builder = BUILDERS.get(type(getattr(layer, "mixer", None)))
    if builder is None or type(layer.norm) is not Nemotron3RMSNorm:
        return None
    return builder(layer.norm, layer.mixer, cache, dtype)


def _state_ready(state) -> bool:
    if state is None:  # MoE / MLP layers hold no state
        return True
    return state.has_previous if hasattr(state, "has_previous") else state.key_buffer is not None


__all__ = ["decode_ready", "fits", "FusedBlock", "DecodePlan", "cached_plan", "block_plan", "BUILDERS",
           "mamba_block", "attention_block", "moe_block", "mlp_block", "SCORE_FUNCTIONS"]
