"""Multi-token prediction head (Nemotron 3 Super / Ultra, checkpoint keys ``mtp.layers.*``).

One MTP block reads the main model's final hidden state at position t and the embedding of token
t+1 and predicts token t+2: ``x = eh_proj([enorm(e_{t+1}); hnorm(h_t)])``, then the blocks of
``mtp_hybrid_override_pattern`` (``*E``: attention then MoE), then ``final_layernorm`` and the
shared ``lm_head``. Applied recursively (its output hidden state replaces h) it drafts further
tokens with one set of weights, as Super and Ultra do.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Nemotron3Block, Nemotron3RMSNorm


class Nemotron3MTPBlock(Nemotron3Block):
    """A pre-norm block; the first also fuses embedding and hidden state, the last has the final norm."""

    def __init__(self, config, layer_idx: int, block_type: str, first: bool, last: bool) -> None:
        super().__init__(config, layer_idx, block_type)
        h, eps = config.hidden_size, config.layer_norm_epsilon
        if first:
            self.enorm = Nemotron3RMSNorm(h, eps)
            self.hnorm = Nemotron3RMSNorm(h, eps)
            self.eh_proj = nn.Linear(2 * h, h, bias=False)
        if last:
            self.final_layernorm = Nemotron3RMSNorm(h, eps)


class Nemotron3MTP(nn.Module):
    """The MTP head. Its layer indices in a cache start after the main model's layers."""

    def __init__(self, config) -> None:
        super().__init__()
        kinds = config.mtp_layers_block_type
        offset = config.num_hidden_layers
        self.layers = nn.ModuleList(
            Nemotron3MTPBlock(config, offset + i, kind, first=i == 0, last=i == len(kinds) - 1)
            for i, kind in enumerate(kinds)
        )

    @property
    def block_types(self) -> list[str]:
        return [layer.block_type for layer in self.layers]

    def forward(
        self,
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        cache=None,
        mask_args: dict | None = None,
        decode_backend=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [b, l, d] (post final norm, or a previous depth's output), next_embeds [b, l, d].

        Returns ``(output hidden before final_layernorm, normalised hidden for lm_head)``. ``decode_backend``
        (the causal LM's, see `Nemotron3ForCausalLM.decode_backend`) may run the blocks in one call.
        """
        first = self.layers[0]
        x = first.eh_proj(torch.cat([first.enorm(next_embeds), first.hnorm(hidden)], dim=-1))
        if decode_backend is not None:
            fused = decode_backend.mtp_blocks(self, x, cache, mask_args)
            if fused is not None:
                return fused
        for layer in self.layers:
            x = layer(x, cache=cache, **(mask_args or {}))
        return x, self.layers[-1].final_layernorm(x)


__all__ = ["Nemotron3MTP", "Nemotron3MTPBlock"]
