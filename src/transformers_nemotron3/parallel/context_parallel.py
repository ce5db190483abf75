"""Context parallelism for Nemotron 3: zig-zag sequence split, attention with all-gathered K/V, and
head-parallel Mamba (Megatron's ``MambaContextParallel`` scheme), plugged into the model's seams from outside.

Layout: the (padded) sequence is cut into ``2*cp`` chunks; cp rank ``i`` holds chunks ``i`` and
``2*cp-1-i`` so that every rank has the same causal-attention work. Everything that acts per token
(embeddings, norms, projections, MLP, MoE, lm_head) runs unchanged on the local tokens.

- Attention (`*`): an attention kernel registered in transformers' ``AttentionInterface`` under
  ``"nemotron3_context_parallel"`` and selected with ``set_attn_implementation``; the attention module
  still projects q/k/v and applies RoPE at the tokens' global positions. q stays local; k and v are
  all-gathered over the cp group (autograd: the backward reduce-scatters their gradients) and the causal /
  packed-sequence mask is built from the *global* positions of the local queries and the gathered keys.
- Mamba (`M`): `ContextParallelMamba` replaces only the mixer's ``sequence_mixer`` seam (``in_proj``, the
  gated norm and ``out_proj`` run unchanged on the local tokens). One all-to-all turns ``[b, L/cp,
  channels]`` into ``[b, L, channels/cp]``: each rank gets the whole sequence, in original order, for
  ``heads/cp`` heads and ``n_groups/cp`` B/C groups (plus their conv channels and dt); then the same
  `mamba2.conv_scan` as on one device runs (so mamba_ssm / causal_conv1d on CUDA) with the conv weight,
  ``dt_bias``, ``A_log`` and ``D`` sliced (gradients flow into the full parameters); a second all-to-all
  brings ``y`` back to the local tokens.

Both kernels read the step's `CPState` (positions, packed-sequence ids) from the ``context_parallel`` keyword
argument that `ContextParallelLM` passes to the model, which hands its extra keyword arguments to every mixer.
Parameters and state-dict keys are untouched; the loss is the model's own, from ``shift_labels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..modeling.mamba2 import Mamba2Weights, Nemotron3Mamba2Mixer, conv_scan
from ..modeling.modeling_nemotron3 import seq_idx_from_position_ids
from .dispatcher import all_to_all_v

ATTENTION_NAME = "nemotron3_context_parallel"


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


def _state(kwargs: dict) -> "CPState":
    st = kwargs.get("context_parallel")
    if st is None:
        raise ValueError("this model is context-parallel (apply_context_parallel); call it through "
                         "`ContextParallelLM`, which passes each step's `context_parallel` state.")
    return st


def context_parallel_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask=None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """Attention kernel (transformers' attention-interface signature) over the cp group: q [b, h, L/cp, d] local,
    k / v all-gathered to [b, kv_h, L, d]; mask from global positions and packed-sequence ids. Returns
    ``(out [b, L/cp, h, d], None)``."""
    st = _state(kwargs)
    key = _GatherAlongDim.apply(key, 2, st.group)
    value = _GatherAlongDim.apply(value, 2, st.group)
    qpos, kpos = st.local_positions, st.gathered_positions
    allowed = (kpos[None, :] <= qpos[:, None])[None]
    if st.seq_idx is not None:
        allowed = allowed & (st.seq_idx[:, qpos][:, :, None] == st.seq_idx[:, kpos][:, None, :])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], dropout_p=dropout,
                                         scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None


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


class ContextParallelMamba:
    """The Mamba-2 ``sequence_mixer`` seam under context parallelism: local tokens of every channel -> all tokens of
    this rank's heads (all-to-all), `conv_scan` (the one-device kernels, on sliced parameters), and back."""

    def __call__(self, mixer: Nemotron3Mamba2Mixer, xbc: torch.Tensor, dt: torch.Tensor, state, **kwargs
                 ) -> torch.Tensor:
        st = _state(kwargs)
        if state is not None:
            raise ValueError("context parallelism is for training/prefill without a cache; pass use_cache=False.")
        slices = [_mamba_channel_slices(mixer, st.cp, r) for r in range(st.cp)]
        parts = [torch.cat([xbc[..., xi.to(xbc.device)], dt[..., hi.to(dt.device)]], dim=-1) for xi, hi in slices]
        full = _seq_to_heads(st, parts)
        my_xbc, my_heads = (s.to(xbc.device) for s in slices[st.rank])
        xbc_h, dt_h = full.split([my_xbc.numel(), my_heads.numel()], dim=-1)
        w = Mamba2Weights.of(mixer)
        mine = Mamba2Weights(w.conv_weight[my_xbc], w.conv_bias[my_xbc] if w.conv_bias is not None else None,
                             w.dt_bias[my_heads], w.A[my_heads], w.D[my_heads], mixer.n_groups // st.cp)
        y, _, _ = conv_scan(xbc_h, dt_h, mine, head_dim=mixer.head_dim, state_size=mixer.state_size,
                            chunk_size=mixer.chunk_size, time_step_limit=mixer.time_step_limit,
                            use_kernels=mixer.use_kernels, seq_idx=st.seq_idx)
        return _heads_to_seq(st, y)


# ------------------------------------------------------------------------------------------- model
def apply_context_parallel(model: nn.Module, cp_group) -> CPState:
    """Plug the CP kernels into ``model`` (a `Nemotron3ForCausalLM`): attention through the attention interface,
    Mamba through each mixer's ``sequence_mixer`` seam. Returns the state `ContextParallelLM` fills per step."""
    from transformers import AttentionInterface

    state = CPState(group=cp_group, cp=dist.get_world_size(cp_group), rank=dist.get_rank(cp_group))
    for module in model.modules():
        if isinstance(module, Nemotron3Mamba2Mixer):
            if module.num_heads % state.cp or module.n_groups % state.cp:
                raise ValueError(f"Mamba CP needs mamba_num_heads ({module.num_heads}) and n_groups "
                                 f"({module.n_groups}) divisible by context_parallel_size={state.cp}.")
            module.sequence_mixer = ContextParallelMamba()
    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention)
    model.set_attn_implementation(ATTENTION_NAME)
    return state


class ContextParallelLM(nn.Module):
    """Wraps a CP-applied `Nemotron3ForCausalLM`: takes the *full* batch (identical on the cp ranks),
    pads it on the right to a multiple of ``2*cp`` (exact for a causal model: padding only follows),
    keeps this rank's zig-zag tokens and returns the loss of the whole sequence. The padding is passed to the
    model as this rank's slice of an ``attention_mask``, so the MoE routers leave it out of ``expert_load`` and
    the aux loss (the bias update then matches one process on the unpadded rows).

    The loss is the model's own: the labels are shifted on the full sequence, this rank's share goes in as
    ``shift_labels`` with ``num_items_in_batch`` = the sequence's label count, so the model returns ``lm_loss`` =
    (this rank's summed token loss) / (all tokens). The returned ``loss`` has the value of the global mean loss
    over the sequence tokens (plus the MoE aux loss), and its gradient is ``cp`` times this rank's share, so that
    averaging gradients over all ranks (dp x cp) gives the exact gradient (see `gradients.reduce_gradients`).
    ``logits`` are the local tokens' logits.
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
        if kwargs.get("shift_labels") is not None:
            raise ValueError("ContextParallelLM shifts `labels` on the whole sequence itself; pass `labels`, "
                             "not `shift_labels`.")
        base = getattr(self.model, "module", self.model)  # DDP
        if labels is not None and base.training and getattr(base, "mtp", None) is not None \
                and base.config.mtp_loss_scale > 0:
            raise ValueError("the MTP loss is not computed under context parallelism (its shifted inputs span ranks); "
                             "set config.mtp_loss_scale = 0 for CP runs, or train the MTP head without CP.")
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
        if real is not None:  # the CP kernels ignore it (padding only follows); the MoE routers do not count it
            kwargs["attention_mask"] = real[:, pos]
        if labels is not None:
            kwargs["shift_labels"] = labels[:, pos]
            kwargs["num_items_in_batch"] = (labels != -100).sum().clamp(min=1)
        out = self.model(input_ids=input_ids[:, pos], position_ids=position_ids[:, pos], use_cache=False,
                         context_parallel=st, **kwargs)
        if labels is None:
            return out
        share = out.lm_loss  # this rank's token-loss sum / the sequence's token count
        total = share.detach().clone()
        dist.all_reduce(total, group=st.group)
        loss = share * st.cp + (total - share * st.cp).detach()
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        out["loss"] = loss
        out["lm_loss"] = total
        return out


__all__ = [
    "zigzag_positions", "CPState", "apply_context_parallel", "ContextParallelLM", "ContextParallelMamba",
    "context_parallel_attention", "ATTENTION_NAME",
]
