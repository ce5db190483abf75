"""`CpuDecoder`: whole cached decode steps of one model in one C++ call, through the model's ``decode_backend`` hook.

At batch 1 a decode step of a small model spends about as long in Python and small ATen ops (module calls,
argument checks, casts, a dozen ops per block) as in the kernels. `Nemotron3ForCausalLM.forward` asks its
``decode_backend`` first on a plain cached inference step (no loss, no recorded outputs, at most the last
logits); the decoder answers with (hidden after the final norm, fp32 logits) from one ``decode_step`` call
(`decode_plan.DecodePlan`: embedding lookup, every block, final norm, LM head), or None where it does not
apply, and the model runs its modules. The MTP head's blocks go the same way while drafting
(``mtp_blocks``). The model files know only the hook (None by default); this object and its plans live here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.blocks import Nemotron3RMSNorm
from ..modeling.cache import Nemotron3HybridCache
from .decode_plan import cached_plan, decode_ready, fits


def _advise(tensors) -> None:
    """Back the tensors a new plan streams with huge pages (``NEMOTRON3_HUGEPAGES=0`` switches it off)."""
    from . import hugepages

    hugepages.advise(tensors)


class CpuDecoder:
    """The decode backend `enable_cpu_kernels` installs on one model (``model.decode_backend``).

    Holds no model reference and no weights: plans are built from the model it is called with and kept in
    the cache (``cache.decode_plans``), so a deep-copied cache or model gets its own.
    """

    def __init__(self, huge_pages: bool = True) -> None:
        self.on_new_plan = _advise if huge_pages else None  # hugepages also honours NEMOTRON3_HUGEPAGES=0

    def __call__(self, model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, cache, seq_idx: torch.Tensor | None = None):
        """A cached decode step of ``model`` (a `Nemotron3ForCausalLM`): (hidden after the final norm, fp32 logits)
        for one token per sequence, or a few while the Mamba states record (speculative verification); None where
        it does not apply (autograd, padding, packing, a block the kernels do not cover, no cache yet, ...)."""
        backbone, lm_head = model.model, model.lm_head
        x = input_ids if input_ids is not None else inputs_embeds
        dtype = backbone.embeddings.weight.dtype if input_ids is not None else inputs_embeds.dtype
        if (not isinstance(cache, Nemotron3HybridCache) or seq_idx is not None or model.training
                or x.dim() != (2 if input_ids is not None else 3) or not decode_ready(x, dtype)
                or not cache.seen_tokens
                or (attention_mask is not None and not bool(attention_mask.all()))
                or type(backbone.norm_f) is not Nemotron3RMSNorm
                or (input_ids is not None and type(backbone.embeddings) is not nn.Embedding)
                or not fits(dtype, lm_head)):
            return None
        plan = cached_plan(backbone, backbone.layers, cache, dtype, (lm_head.weight,), self.on_new_plan)
        if plan is None or not plan.applies(x.shape[1]):
            return None
        if input_ids is not None:
            _, hidden, logits = plan.run(backbone.embeddings.weight, input_ids, backbone.norm_f, lm_head)
        else:
            _, hidden, logits = plan.run(inputs_embeds, None, backbone.norm_f, lm_head)
        return hidden, logits

    def mtp_blocks(self, mtp: nn.Module, x: torch.Tensor, cache, mask_args: dict | None):
        """The MTP head's blocks and final norm in one call (drafting, and the head's pass over newly accepted
        positions): (output hidden, normed hidden), or None where that does not apply."""
        if (cache is None or mtp.training or not decode_ready(x, x.dtype)
                or any((mask_args or {}).get(k) is not None for k in ("attn_mask", "padding_mask", "seq_idx"))
                or type(mtp.layers[-1].final_layernorm) is not Nemotron3RMSNorm):
            return None
        plan = cached_plan(mtp, mtp.layers, cache, x.dtype, (), self.on_new_plan)
        if plan is None or not plan.applies(x.shape[1]):
            return None
        out, normed, _ = plan.run(x, None, mtp.layers[-1].final_layernorm)
        return out, normed


__all__ = ["CpuDecoder"]
