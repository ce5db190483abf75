"""The pre-norm residual block of Nemotron 3: ``h = h + mixer(RMSNorm(h))`` with one mixer per layer."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Nemotron3Attention
from .mamba2 import Nemotron3Mamba2Mixer
from .moe import Nemotron3MLP, Nemotron3MoE
from .norms import rms_norm

try:  # transformers' checkpointing-aware layer base (present in all 5.x releases)
    from transformers.modeling_layers import GradientCheckpointingLayer as _BlockBase
except ImportError:  # pragma: no cover
    _BlockBase = nn.Module


class Nemotron3RMSNorm(nn.Module):
    """RMSNorm in fp32 with the weight multiplied in fp32, then cast back (as the reference code does).

    ``kernel`` is a seam (a plain attribute, None by default): a backend's ``kernel(norm, x)`` returning the same
    result, or None where it does not apply (the CPU kernels install one per model)."""

    kernel = None

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            out = self.kernel(self, x)
            if out is not None:
                return out
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`Nemotron3RMSNorm` written out op by op (the reference `norms.rms_norm` is tested against)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x).to(dtype)


MIXER_TYPES: dict[str, type[nn.Module]] = {
    "linear_attention": Nemotron3Mamba2Mixer,
    "full_attention": Nemotron3Attention,
    "moe": Nemotron3MoE,
    "mlp": Nemotron3MLP,
}
"""The block table: block kind (``config.layers_block_type``) -> mixer class, built as ``cls(config, layer_idx)`` and
called as ``mixer(normed_hidden, cache=cache, **layer_kwargs)`` (the model's per-forward arguments: ``attn_mask``,
``padding_mask``, ``padding_mask_2d``, ``seq_idx``, ``position_ids`` and whatever else it was given; each mixer takes
what it needs). A mixer returns the update, or a tuple whose first item is the update. Each class also says

- ``pattern_char``: its letter in ``hybrid_override_pattern`` (the config reads the letters from this table);
- ``cache_layer(config, batch_size, dtype, device)`` (optional): the transformers cache layer holding its state in
  `Nemotron3HybridCache`; kinds without it are stateless.

Adding a block kind = one entry here + its mixer class (docs/architecture.md, "Adding a block kind")."""


class Nemotron3Block(_BlockBase):
    """One layer: RMSNorm, then the mixer its kind names in `MIXER_TYPES`, then the residual add."""

    def __init__(self, config, layer_idx: int, block_type: str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.block_type = block_type
        self.norm = Nemotron3RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if block_type not in MIXER_TYPES:  # the config validates block types; this is an invariant
            raise AssertionError(block_type)
        self.mixer = MIXER_TYPES[block_type](config, layer_idx)

    def forward(self, hidden_states: torch.Tensor, cache=None, **layer_kwargs) -> torch.Tensor:
        out = self.mixer(self.norm(hidden_states), cache=cache, **layer_kwargs)
        if isinstance(out, tuple):  # attention returns (output, weights); the weights are recorded by the model
            out = out[0]
        return hidden_states + out


__all__ = ["MIXER_TYPES", "Nemotron3Block", "Nemotron3RMSNorm", "rms_norm_reference"]
