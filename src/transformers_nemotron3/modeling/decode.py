"""The lean one-token decode step: the same math as the layers' forward, with the per-op overhead cut.

At batch-1 decode a layer does almost no arithmetic besides reading its weights, so the time
goes to framework overhead: module calls, dtype no-ops, mask and position bookkeeping, many small
kernels. `decode_step` runs one new token per sequence through the stack without the mask,
position and padding bookkeeping of the general forward, with 2-D activations, the fused
single-step SSM update and a one-pass RMSNorm. Projections and norms are still called as modules,
so whatever wraps or replaces them (LoRA adapters, NVFP4 linears, hooks) applies here too. It is
taken only when every condition below holds (`can_decode_fast`); anything else (training,
autograd, prefill, speculative verification, packed sequences, RoPE, CUDA kernels, a mixer whose
forward a plugin swapped) uses the layers' regular forward, which this path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import MambaState
from .mamba2 import use_kernels
from .moe import Nemotron3MoE, routed_few_tokens

_FAST_ATTENTION = ("sdpa", "eager")


def can_decode_fast(model, embeds: torch.Tensor, cache, position_ids, seq_idx, output_hidden_states) -> bool:
    """Whether `decode_step` may run this forward (else the regular path does)."""
    if cache is None or embeds.shape[1] != 1 or model.training or torch.is_grad_enabled():
        return False
    if seq_idx is not None or output_hidden_states or model.config.use_rope:
        return False
    if (getattr(model.config, "_attn_implementation", None) or "sdpa") not in _FAST_ATTENTION:
        return False
    for st in cache.layers.values():
        if isinstance(st, MambaState) and (not st.has_previous or st.history is not None):
            return False
    # a plugin that rebinds a mixer's forward (context parallelism) owns that layer: keep its path
    return not any("forward" in vars(layer.mixer) or "forward" in vars(layer) for layer in model.layers)


def _mamba(mixer, x: torch.Tensor, state: MambaState) -> torch.Tensor:
    """One token through a Mamba-2 mixer: x [b, d] (normed) -> [b, d]."""
    b = x.shape[0]
    zxbcdt = mixer.in_proj(x)
    z, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    conv = state.conv  # [b, channels, k]: shift the window left by one, append the new input
    conv.copy_(torch.cat([conv[:, :, 1:], xbc.unsqueeze(-1).to(conv.dtype)], dim=-1))
    w = mixer.conv1d.weight.view(mixer.conv_dim, -1)
    xbc = torch.linalg.vecdot(conv.to(w.dtype), w)
    if mixer.conv1d.bias is not None:
        xbc = xbc + mixer.conv1d.bias
    xbc = F.silu(xbc)
    xs, B, C = xbc.split([mixer.intermediate_size, mixer.n_groups * mixer.state_size,
                          mixer.n_groups * mixer.state_size], dim=-1)
    h, p, g, n = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.state_size
    dt = mixer._dt(dt)  # [b, h] fp32
    s = state.ssm.view(b, g, h // g, p, n)
    A = -torch.exp(mixer.A_log.float())
    xf = xs.float().view(b, g, h // g, p)
    s.mul_(torch.exp(dt * A).view(b, g, h // g, 1, 1))
    s.addcmul_((dt.view(b, g, h // g, 1) * xf).unsqueeze(-1), B.float().view(b, g, 1, 1, n))
    y = torch.matmul(s.view(b, g, -1, n), C.float().view(b, g, n, 1)).view(b, h, p)
    y = torch.addcmul(y, mixer.D.float()[:, None], xf.view(b, h, p)).view(b, -1)
    return mixer.out_proj(mixer.norm(y, z, x.dtype))  # gated grouped RMSNorm, output projection


def _attention(attn, x: torch.Tensor, state, key_mask: torch.Tensor | None) -> torch.Tensor:
    """One query per sequence against the cached keys: x [b, d] -> [b, d]. No RoPE (checked by the caller)."""
    b = x.shape[0]
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, attn.num_heads, 1, hd)
    k = attn.k_proj(x).view(b, attn.num_kv_heads, 1, hd)
    v = attn.v_proj(x).view(b, attn.num_kv_heads, 1, hd)
    if attn.use_qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    k, v = state.update(k, v)
    mask = key_mask[:, None, None, :] if key_mask is not None else None
    if (getattr(attn.config, "_attn_implementation", None) or "sdpa") == "eager":
        from .attention import eager_attention

        out = eager_attention(q, k, v, mask, attn.scaling, False, 0.0, False)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                             enable_gqa=attn.num_key_value_groups > 1)
    return attn.o_proj(out.view(b, -1))


def _moe(moe: Nemotron3MoE, x: torch.Tensor) -> torch.Tensor:
    """One token per sequence through an MoE layer: x [b, d] -> [b, d]."""
    _, _, weights, topk_idx = _route(moe, x)
    few = moe.use_few_routes_path(topk_idx)
    routed_in = moe.fc1_latent_proj(x) if moe.fc1_latent_proj is not None else x
    if not few:
        x_sorted, counts, ctx = moe.dispatcher.dispatch(routed_in, topk_idx, moe.num_experts)
        return moe._finish(moe.dispatcher.combine(moe.experts(x_sorted, counts), weights, ctx, x.shape[0]), x)
    if moe.fc2_latent_proj is None and moe.shared_experts is not None and x.dtype == torch.float32:
        return routed_few_tokens(moe.experts, routed_in, weights, topk_idx, moe.shared_experts(x))
    acc = routed_in.new_zeros(routed_in.shape, dtype=torch.float32)
    return moe._finish(routed_few_tokens(moe.experts, routed_in, weights, topk_idx, acc), x)


def _route(moe: Nemotron3MoE, x: torch.Tensor):
    out = moe.gate(x)
    moe.last_router_logits = out[0]
    moe.last_aux_loss = None
    return out


def decode_step(model, embeds: torch.Tensor, cache, padding: torch.Tensor | None) -> torch.Tensor:
    """Hidden states [b, 1, d] (after the final norm) for one new token per sequence; updates ``cache``.

    ``padding`` [b, kv_len] bool (True = real token) masks padded keys of left-padded batches.
    """
    b = embeds.shape[0]
    hidden = embeds.view(b, -1)
    for layer in model.layers:
        mixer = layer.mixer
        x = layer.norm(hidden)
        kind = layer.block_type
        if kind == "mamba":
            state = cache.get(layer.layer_idx)
            if use_kernels(x, mixer.use_kernels):
                out = mixer(x.view(b, 1, -1), cache=cache).view(b, -1)
            else:
                out = _mamba(mixer, x, state)
        elif kind == "attention":
            out = _attention(mixer, x, cache.get(layer.layer_idx), padding)
        elif kind == "moe":
            out = _moe(mixer, x)
        else:
            out = mixer(x)
        hidden = hidden + out
    return model.norm_f(hidden).view(b, 1, -1)


__all__ = ["can_decode_fast", "decode_step"]
