"""Grouped-query attention of Nemotron 3 (`*` layers): no positional encoding by default, optional RoPE.

The attention kernel is chosen by ``config._attn_implementation``: ``"eager"`` and ``"sdpa"`` are
computed here (masks built once per forward by the model, as booleans, True = may attend); any
other name (``"flash_attention_2"``, ...) goes through transformers' attention interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables ``[b, l, dim]`` for the rotated part of each head."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotate-half RoPE on the first ``cos.shape[-1]`` channels of ``x`` [b, h, l, d]."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    xr = xr * cos[:, None] + rotated * sin[:, None]
    return torch.cat([xr, xp], dim=-1) if xp.shape[-1] else xr


def eager_attention(q, k, v, mask: torch.Tensor | None, scale: float, causal: bool, dropout: float, training: bool):
    """Reference attention with fp32 softmax; ``mask`` is boolean [b, 1, q, k] or None."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is None and causal:
        ql, kl = q.shape[2], k.shape[2]
        mask = torch.ones(ql, kl, dtype=torch.bool, device=q.device).tril(kl - ql)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v)


class Nemotron3Attention(nn.Module):
    """GQA attention with q/k/v/o projections (no biases in Nemotron 3)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.use_rope = config.use_rope
        self.rotary_dim = int(self.head_dim * config.partial_rotary_factor) // 2 * 2
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        padding_mask_2d: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = rotary_cos_sin(position_ids, self.rotary_dim, self.config.rope_theta, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        state = cache.get(self.layer_idx) if cache is not None else None
        if state is not None:
            k, v = state.update(k, v)
        causal = length > 1 and mask is None
        dropout = self.config.attention_dropout if self.training else 0.0
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if impl == "eager":
            out = eager_attention(q, k, v, mask, self.scaling, causal, dropout, self.training)
        elif impl == "sdpa":
            if causal and k.shape[2] != length:  # continuation with a cache: sdpa's is_causal is top-left aligned
                mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - length)
                causal = False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.scaling, enable_gqa=self.num_key_value_groups > 1)
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            out, _ = ALL_ATTENTION_FUNCTIONS[impl](
                self, q, k, v, padding_mask_2d, dropout=dropout, scaling=self.scaling, position_ids=position_ids
            )
            return self.o_proj(out.reshape(b, length, -1))
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


__all__ = ["Nemotron3Attention", "eager_attention", "apply_rotary", "rotary_cos_sin"]
