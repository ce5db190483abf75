"""The pre-norm residual block of Nemotron 3: ``h = h + mixer(RMSNorm(h))`` with one mixer per layer."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Nemotron3Attention
from .fused_decode import decode_ready, fits, mlp_block
from .mamba2 import Nemotron3Mamba2Mixer
from .moe import Nemotron3MLP, Nemotron3MoE, _relu2
from .norms import rms_norm

try:  # transformers' checkpointing-aware layer base (present in all 5.x releases)
    from transformers.modeling_layers import GradientCheckpointingLayer as _BlockBase
except ImportError:  # pragma: no cover
    _BlockBase = nn.Module


class Nemotron3RMSNorm(nn.Module):
    """RMSNorm in fp32 with the weight multiplied in fp32, then cast back (as the reference code does)."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`Nemotron3RMSNorm` written out op by op (the reference `norms.rms_norm` is tested against)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x).to(dtype)


class Nemotron3Block(_BlockBase):
    """One layer: RMSNorm, then the mixer named by its pattern character, then the residual add."""

    def __init__(self, config, layer_idx: int, block_type: str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.block_type = block_type
        self.norm = Nemotron3RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if block_type == "linear_attention":
            self.mixer = Nemotron3Mamba2Mixer(config, layer_idx)
        elif block_type == "full_attention":
            self.mixer = Nemotron3Attention(config, layer_idx)
        elif block_type == "moe":
            self.mixer = Nemotron3MoE(config, layer_idx)
        elif block_type == "mlp":
            self.mixer = Nemotron3MLP(config.hidden_size, config.intermediate_size, config.mlp_hidden_act,
                                      config.mlp_bias)
        else:  # the config validates block types; this is an invariant
            raise AssertionError(block_type)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attn_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        padding_mask_2d: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if padding_mask is None and hidden_states.dim() == 3 and decode_ready(hidden_states, hidden_states.dtype):
            fused = self.fused_decode_block(cache, hidden_states.dtype, attn_mask)  # the block in one kernel call
            out = fused(hidden_states) if fused is not None else None
            if out is not None:
                return out
        residual = hidden_states
        x = self.norm(hidden_states)
        if self.block_type == "linear_attention":
            x = self.mixer(x, cache=cache, padding_mask=padding_mask, seq_idx=seq_idx)
        elif self.block_type == "full_attention":
            x, _ = self.mixer(x, cache=cache, mask=attn_mask, position_ids=position_ids,
                              padding_mask_2d=padding_mask_2d)
        elif self.block_type == "moe" and padding_mask is not None:  # padding stays out of the router statistics
            x = self.mixer(x, token_mask=padding_mask)
        else:
            x = self.mixer(x)
        return residual + x

    def fused_decode_block(self, cache, dtype: torch.dtype, attn_mask: torch.Tensor | None = None):
        """This block as a `fused_decode.FusedBlock` (callable as ``h -> self(h)`` in one kernel call, and the
        unit a `DecodePlan` is built from), or None where the kernels do not cover it."""
        if type(self.norm) is not Nemotron3RMSNorm:
            return None
        if self.block_type == "linear_attention":
            return self.mixer.fused_decode_block(self.norm, cache, dtype)
        if self.block_type == "full_attention":
            return self.mixer.fused_decode_block(self.norm, cache, dtype, attn_mask)
        if self.block_type == "moe":
            return self.mixer.fused_decode_block(self.norm, dtype)
        mlp = self.mixer
        if type(mlp) is Nemotron3MLP and mlp.act is _relu2 and fits(dtype, mlp.up_proj, mlp.down_proj):
            return mlp_block(self.norm, mlp)
        return None


__all__ = ["Nemotron3Block", "Nemotron3RMSNorm", "rms_norm_reference"]
