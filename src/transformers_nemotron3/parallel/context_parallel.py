"""Context parallelism for Nemotron 3: zig-zag sequence split, attention with all-gathered K/V, and
head-parallel Mamba (Megatron's ``MambaContextParallel`` scheme), applied from outside the model.

Layout: the (padded) sequence is cut into ``2*cp`` chunks; cp rank ``i`` holds chunks ``i`` and
``2*cp-1-i`` so that every rank has the same causal-attention work. Everything that acts per token
(embeddings, norms, MLP, MoE, lm_head) runs unchanged on the local tokens.

- Attention (`*`): q stays local; k and v are all-gathered over the cp group (autograd: the backward
  reduce-scatters their gradients) and the causal / packed-sequence mask is built from the *global*
  positions of the local queries and of the gathered keys, so the gathered keys need no reordering.
- Mamba (`M`): after ``in_proj`` one all-to-all turns ``[b, L/cp, channels]`` into
  ``[b, L, channels/cp]``: each rank gets the whole sequence, in original order, for ``heads/cp``
  heads and ``n_groups/cp`` B/C groups (plus their conv channels and dt). The causal conv and the
  chunked SSD scan then run exactly as on one device, with the conv weight, ``dt_bias``, ``A_log``
  and ``D`` sliced (gradients flow into the full parameters). A second all-to-all brings ``y`` back to
  the local tokens, where the gated RMSNorm (with the local ``z``) and ``out_proj`` run.

The swapped forwards are bound to the existing module instances (``types.MethodType``); parameters
and state-dict keys are untouched. A `CPState` shared by all swapped layers carries the positions and
packed-sequence ids of the current step; `ContextParallelLM.forward` sets it.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..modeling.attention import Nemotron3Attention, apply_rotary, rotary_cos_sin
from ..modeling.mamba2 import Nemotron3Mamba2Mixer, causal_conv
from ..modeling.modeling_nemotron3 import seq_idx_from_position_ids
from ..modeling.ssd import ssd_chunked
from .dispatcher import all_to_all_v


def zigzag_positions(length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions held by cp ``rank``: chunks ``rank`` and ``2*cp-1-rank`` of ``2*cp`` equal chunks."""
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} must be divisible by 2*context_parallel_size={2 * cp}.")
    c = length // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


@dataclass
class CPState:
    """What the swapped layers need to know about the current step."""

    group: object
    cp: int
    rank: int
    local_positions: torch.Tensor | None = None  # [L/cp] global positions of this rank's tokens
    gathered_positions: torch.Tensor | None = None  # [L] positions in all-gather (rank-major) order
    restore: torch.Tensor | None = None  # [L] index into gathered order giving original order
    seq_idx: torch.Tensor | None = None  # [b, L] packed-sequence ids of the full sequence, or None

    def set_length(self, length: int, device) -> None:
        self.local_positions = zigzag_positions(length, self.cp, self.rank, device)
        self.gathered_positions = torch.cat([zigzag_positions(length, self.cp, r, device) for r in range(self.cp)])
        self.restore = torch.argsort(self.gathered_positions)


# ------------------------------------------------------------------------------------------- attention
class _GatherAlongDim(torch.autograd.Function):
    """All-gather along ``dim`` (rank-major); backward = reduce-scatter of the gradient, done as an
    all-to-all plus a local sum (gloo has no reduce-scatter). Gradients are made contiguous first:
    ``torch.distributed.nn.functional.all_gather`` hands gloo the non-contiguous slices of a ``cat``
    backward, which gave wrong K/V gradients here."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        send = torch.stack(grad.chunk(world, dim=ctx.dim)).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ctx.group)
        return recv.sum(0), None, None


def _cp_attention_forward(self: Nemotron3Attention, hidden_states, cache=None, mask=None, position_ids=None,
                          padding_mask_2d=None, output_attentions=False):
    st: CPState = self._cp_state
    if cache is not None:
        raise ValueError("context parallelism is for training/prefill without a cache; pass use_cache=False.")
    b, length, _ = hidden_states.shape
    if hasattr(self, "project_qkv"):  # the model's own seam: projections, optional q/k norm, RoPE (global positions)
        q, k, v = self.project_qkv(hidden_states, position_ids)
    else:  # older model code without the seam
        q = self.q_proj(hidden_states).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = rotary_cos_sin(position_ids, self.rotary_dim, self.config.rope_theta, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k = _GatherAlongDim.apply(k, 2, st.group)
    v = _GatherAlongDim.apply(v, 2, st.group)
    qpos, kpos = st.local_positions, st.gathered_positions
    allowed = (kpos[None, :] <= qpos[:, None])[None]
    if st.seq_idx is not None:
        allowed = allowed & (st.seq_idx[:, qpos][:, :, None] == st.seq_idx[:, kpos][:, None, :])
    dropout = self.config.attention_dropout if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], dropout_p=dropout, scale=self.scaling,
                                         enable_gqa=self.num_key_value_groups > 1)
    return self.o_proj(out.transpose(1, 2).reshape(b, length, -1)), None


# ------------------------------------------------------------------------------------------- mamba
def _mamba_channel_slices(m: Nemotron3Mamba2Mixer, cp: int, r: int):
    """Indices of cp rank ``r``'s channels: into xBC (x heads, B groups, C groups) and into heads."""
    hl, gl = m.num_heads // cp, m.n_groups // cp
    hd, n, inter = m.head_dim, m.state_size, m.intermediate_size
    gn = m.n_groups * n
    xbc = torch.cat([
        torch.arange(r * hl * hd, (r + 1) * hl * hd),
        inter + torch.arange(r * gl * n, (r + 1) * gl * n),
        inter + gn + torch.arange(r * gl * n, (r + 1) * gl * n),
    ])
    return xbc, torch.arange(r * hl, (r + 1) * hl)


def _seq_to_heads(st: CPState, parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts[j]`` [b, L/cp, w] is rank j's channel slice of my tokens -> my slice over the full sequence."""
    send = torch.stack(parts).contiguous()  # [cp, b, L/cp, w]
    recv = all_to_all_v(send, None, None, st.group)  # [cp(src), b, L/cp, w]
    full = recv.permute(1, 0, 2, 3).reshape(send.shape[1], -1, send.shape[3])  # gathered (rank-major) order
    return full[:, st.restore]


def _heads_to_seq(st: CPState, y: torch.Tensor) -> torch.Tensor:
    """``y`` [b, L, w] (my heads, full sequence) -> [b, L/cp, cp*w] (all heads, my tokens)."""
    b, _, w = y.shape
    send = y[:, st.gathered_positions].reshape(b, st.cp, -1, w).permute(1, 0, 2, 3).contiguous()
    recv = all_to_all_v(send, None, None, st.group)  # [cp(head slice), b, L/cp, w]
    return recv.permute(1, 2, 0, 3).reshape(b, -1, st.cp * w)


def _cp_mamba_forward(self: Nemotron3Mamba2Mixer, hidden_states, cache=None, padding_mask=None, seq_idx=None):
    st: CPState = self._cp_state
    if cache is not None:
        raise ValueError("context parallelism is for training/prefill without a cache; pass use_cache=False.")
    b, local_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    z, xbc, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    slices = [_mamba_channel_slices(self, st.cp, r) for r in range(st.cp)]
    parts = [torch.cat([xbc[..., xi.to(xbc.device)], dt[..., hi.to(dt.device)]], dim=-1) for xi, hi in slices]
    full = _seq_to_heads(st, parts)
    my_xbc, my_heads = (s.to(hidden_states.device) for s in slices[st.rank])
    xbc_h, dt_h = full.split([my_xbc.numel(), my_heads.numel()], dim=-1)
    weight = self.conv1d.weight.squeeze(1)[my_xbc]
    bias = self.conv1d.bias[my_xbc] if self.conv1d.bias is not None else None
    conv = F.silu(causal_conv(xbc_h.transpose(1, 2), weight, bias, None, st.seq_idx)).transpose(1, 2)
    hl, gl = self.num_heads // st.cp, self.n_groups // st.cp
    length = conv.shape[1]
    x, B, C = conv.split([hl * self.head_dim, gl * self.state_size, gl * self.state_size], dim=-1)
    dt_full = F.softplus(dt_h.float() + self.dt_bias[my_heads].float())
    lo, hi = self.time_step_limit
    if lo > 0.0 or hi != float("inf"):
        dt_full = dt_full.clamp(lo, hi)
    A = -torch.exp(self.A_log[my_heads].float())
    y, _ = ssd_chunked(x.reshape(b, length, hl, self.head_dim), dt_full, A, B.reshape(b, length, gl, self.state_size),
                       C.reshape(b, length, gl, self.state_size), self.chunk_size, D=self.D[my_heads],
                       seq_idx=st.seq_idx)
    y = _heads_to_seq(st, y.reshape(b, length, hl * self.head_dim))
    return self.out_proj(self.norm(y, z, dtype))


# ------------------------------------------------------------------------------------------- model
def apply_context_parallel(model: nn.Module, cp_group) -> CPState:
    """Swap the forward of every attention and Mamba mixer for its CP version; returns the shared state."""
    state = CPState(group=cp_group, cp=dist.get_world_size(cp_group), rank=dist.get_rank(cp_group))
    for module in model.modules():
        if isinstance(module, Nemotron3Attention):
            module.forward = types.MethodType(_cp_attention_forward, module)
        elif isinstance(module, Nemotron3Mamba2Mixer):
            if module.num_heads % state.cp or module.n_groups % state.cp:
                raise ValueError(f"Mamba CP needs mamba_num_heads ({module.num_heads}) and n_groups "
                                 f"({module.n_groups}) divisible by context_parallel_size={state.cp}.")
            module.forward = types.MethodType(_cp_mamba_forward, module)
        else:
            continue
        module._cp_state = state
    return state


class ContextParallelLM(nn.Module):
    """Wraps a CP-applied `Nemotron3ForCausalLM`: takes the *full* batch (identical on the cp ranks),
    pads it on the right to a multiple of ``2*cp`` (exact for a causal model: padding only follows),
    keeps this rank's zig-zag tokens and returns the loss of the whole sequence. The padding is passed to the
    model as this rank's slice of an ``attention_mask``, so the MoE routers leave it out of ``expert_load`` and
    the aux loss (the bias update then matches one process on the unpadded rows).

    The returned ``loss`` has the value of the global mean loss over the sequence tokens, and its
    gradient is ``cp`` times this rank's share, so that averaging gradients over all ranks (dp x cp)
    gives the exact gradient (see `gradients.reduce_gradients`). ``logits`` are the local tokens' logits.
    """

    def __init__(self, model: nn.Module, state: CPState, pad_token_id: int = 0) -> None:
        super().__init__()
        self.model = model
        self.cp_state = state
        self.pad_token_id = pad_token_id

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, labels=None, position_ids=None, seq_idx=None, attention_mask=None, **kwargs):
        st = self.cp_state
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("context parallelism does not take padding masks; pack sequences with position_ids "
                             "or seq_idx and pad on the right with labels -100.")
        b, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None].expand(b, -1)
        if seq_idx is None:
            seq_idx = seq_idx_from_position_ids(position_ids)
        if labels is not None:  # shift on the full sequence: token t predicts t+1
            labels = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1)
        pad = (-length) % (2 * st.cp)
        real = None  # which tokens are real: the model keeps the padding out of the MoE router statistics
        if pad:
            real = torch.ones_like(input_ids, dtype=torch.bool)
            real = F.pad(real, (0, pad), value=False)
            input_ids = F.pad(input_ids, (0, pad), value=self.pad_token_id)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + torch.arange(1, pad + 1)], dim=1)
            if seq_idx is not None:
                seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)
            if labels is not None:
                labels = F.pad(labels, (0, pad), value=-100)
        st.set_length(length + pad, input_ids.device)
        st.seq_idx = seq_idx
        pos = st.local_positions
        if real is not None:  # the swapped attention / Mamba forwards ignore it (padding only follows)
            kwargs["attention_mask"] = real[:, pos]
        out = self.model(input_ids=input_ids[:, pos], position_ids=position_ids[:, pos], use_cache=False, **kwargs)
        if labels is None:
            return out
        local_labels = labels[:, pos]
        count = (labels != -100).sum().clamp(min=1)
        local_sum = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), local_labels.reshape(-1),
                                    ignore_index=-100, reduction="sum")
        share = local_sum / count
        total = share.detach().clone()
        dist.all_reduce(total, group=st.group)
        loss = share * st.cp + (total - share * st.cp).detach()
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        out["loss"] = loss
        return out


__all__ = ["zigzag_positions", "CPState", "apply_context_parallel", "ContextParallelLM"]
