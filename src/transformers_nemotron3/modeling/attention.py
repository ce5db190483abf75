"""Grouped-query attention of Nemotron 3 (`*` layers): no positional encoding by default, optional RoPE.

Options beyond the official checkpoints, used by models upcycled from Llama/Qwen checkpoints (all off by
default): RoPE (``use_rope``) with optional frequency scaling (``rope_scaling_params``: ``linear``,
``dynamic`` NTK or ``llama3``, the formulas of transformers' ``modeling_rope_utils``), and per-head RMSNorm
on queries and keys before RoPE (``attention_qk_norm``, Qwen3's ``q_norm``/``k_norm``).

The attention kernel is chosen by ``config._attn_implementation``: ``"eager"`` and ``"sdpa"`` are
computed here (masks built once per forward by the model, as booleans, True = may attend); any
other name (``"flash_attention_2"``, ...) goes through transformers' attention interface.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import AttentionLayer


def rope_inv_freq(dim: int, theta: float, scaling: dict | None = None, seq_len: int | None = None,
                  max_position_embeddings: int | None = None, device=None) -> torch.Tensor:
    """Inverse frequencies ``[dim // 2]`` of RoPE, optionally scaled (same formulas as transformers).

    ``scaling`` is a validated ``Nemotron3Config.rope_scaling_params`` dict or None:

    - ``linear``: every frequency divided by ``factor`` (position interpolation).
    - ``dynamic``: NTK-aware base ``theta * (factor * L / max_pos - (factor - 1)) ** (dim / (dim - 2))`` once the
      sequence length ``L`` (largest position + 1) exceeds ``max_position_embeddings``; plain RoPE below it.
    - ``llama3``: Llama 3.1's band-wise rule: wavelengths longer than ``original_max_position_embeddings /
      low_freq_factor`` are divided by ``factor``, shorter than ``.../high_freq_factor`` are kept, and the band
      between is interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    kind = scaling.get("rope_type") if scaling else None
    if kind is None:
        return inv_freq
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    if kind == "dynamic":
        if seq_len is None or seq_len <= max_position_embeddings:
            return inv_freq
        base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    assert kind == "llama3", kind
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype,
                   scaling: dict | None = None, max_position_embeddings: int | None = None):
    """cos/sin tables ``[b, l, dim]`` for the rotated part of each head (``scaling``: see `rope_inv_freq`)."""
    seq_len = None
    if scaling and scaling.get("rope_type") == "dynamic":
        seq_len = int(position_ids.max()) + 1
    inv_freq = rope_inv_freq(dim, theta, scaling, seq_len, max_position_embeddings, position_ids.device)
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


def eager_attention(q, k, v, mask: torch.Tensor | None, scale: float, causal: bool, dropout: float, training: bool,
                    return_weights: bool = False):
    """Reference attention with fp32 softmax; ``mask`` is boolean [b, 1, q, k] or None. With ``return_weights``,
    returns ``(output, probabilities [b, heads, q, k])``."""
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
    out = torch.matmul(probs, v)
    return (out, probs) if return_weights else out


class Nemotron3Attention(nn.Module):
    """GQA attention with q/k/v/o projections (no biases in Nemotron 3), optional q/k norm and RoPE."""

    pattern_char = "*"  # this kind's letter in ``hybrid_override_pattern``

    @staticmethod
    def cache_layer(config, batch_size: int, dtype: torch.dtype, device) -> AttentionLayer:
        """This kind's state in `Nemotron3HybridCache`: keys and values, allocated as they arrive."""
        return AttentionLayer()

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
        self.use_qk_norm = bool(getattr(config, "attention_qk_norm", False))
        if self.use_qk_norm:
            # Imported here: blocks.py imports this module, and the model's _init_weights knows this class.
            from .blocks import Nemotron3RMSNorm

            self.q_norm = Nemotron3RMSNorm(self.head_dim, config.layer_norm_epsilon)
            self.k_norm = Nemotron3RMSNorm(self.head_dim, config.layer_norm_epsilon)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin ``[b, l, rotary_dim]`` for these positions (with the config's RoPE scaling, if any)."""
        return rotary_cos_sin(position_ids, self.rotary_dim, self.config.rope_theta, dtype,
                              getattr(self.config, "rope_scaling_params", None), self.config.max_position_embeddings)

    def project_qkv(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None):
        """q ``[b, h, l, d]``, k and v ``[b, kv_h, l, d]``: projections, per-head q/k norm, then RoPE."""
        b, length, _ = hidden_states.shape
        # heads inferred (-1): under tensor parallelism each rank holds a slice of them
        q = self.q_proj(hidden_states).view(b, length, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(b, length, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(b, length, -1, self.head_dim).transpose(1, 2)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.use_rope:
            cos, sin = self.rotary(position_ids, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        padding_mask_2d: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(output, attention probabilities or None)``; the probabilities come from the eager kernel
        (``attn_implementation="eager"``), as in transformers' models. ``attn_mask`` is the model's boolean
        [b, 1, q, kv] mask (None = plain causal); other keyword arguments go to an attention-interface kernel."""
        mask = attn_mask
        b, length, _ = hidden_states.shape
        q, k, v = self.project_qkv(hidden_states, position_ids)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        causal = length > 1 and mask is None
        dropout = self.config.attention_dropout if self.training else 0.0
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        weights = None
        if impl == "eager":
            out, weights = eager_attention(q, k, v, mask, self.scaling, causal, dropout, self.training,
                                           return_weights=True)
        elif impl == "sdpa":
            if causal and k.shape[2] != length:  # continuation with a cache: sdpa's is_causal is top-left aligned
                mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - length)
                causal = False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.scaling, enable_gqa=q.shape[1] != k.shape[1])
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            out, weights = ALL_ATTENTION_FUNCTIONS[impl](
                self, q, k, v, padding_mask_2d, dropout=dropout, scaling=self.scaling, position_ids=position_ids,
                **{key: value for key, value in kwargs.items() if key not in ("padding_mask", "seq_idx")},
            )
            return self.o_proj(out.reshape(b, length, -1)), weights
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1)), weights


__all__ = ["Nemotron3Attention", "eager_attention", "apply_rotary", "rope_inv_freq", "rotary_cos_sin"]
