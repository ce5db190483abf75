"""Stage ``upcycle``: the dense model becomes a Nemotron 3 MoE (every MLP ``-`` -> routed experts ``E``), which
computes the same function at step 0, and gets a fresh MTP head (``*E``) for multi-token prediction.

Uses ``Nemotron3ForCausalLM.from_dense`` (transformers_nemotron3.upcycling). Check: the MoE's logits equal the
dense model's (max difference <= 1e-4), with and without the new MTP head (it does not touch the main path).
"""

from __future__ import annotations

import torch

from ..modeling import Nemotron3ForCausalLM
from .models import dense_model, require_tokenizer, with_mtp_head
from .stage_pretrain import held_out

NAME = "upcycle"
MAX_LOGIT_DIFF = 1e-4


def run(ctx) -> tuple[dict, str]:
    tokenizer = require_tokenizer(ctx)
    dense = ctx.dense if ctx.dense is not None else dense_model(ctx.size, tokenizer, ctx.seed)
    size = ctx.size
    moe = Nemotron3ForCausalLM.from_dense(dense, num_experts=size.num_experts, granularity=size.granularity,
                                          top_k=size.top_k, seed=ctx.seed)
    model, new_params = with_mtp_head(moe, ctx.seed)
    ids = held_out(ctx)
    with torch.no_grad():
        reference = dense.eval()(input_ids=ids).logits
        diff_moe = float((moe(input_ids=ids).logits - reference).abs().max())
        diff_mtp = float((model.eval()(input_ids=ids).logits - reference).abs().max())
    ctx.model = model
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    metrics = {"max_logit_diff": max(diff_moe, diff_mtp), "experts": config.n_routed_experts,
               "top_k": config.num_experts_per_tok, "pattern": config.hybrid_override_pattern,
               "params": params, "mtp_params": sum(p.numel() for n, p in model.named_parameters() if n in new_params)}
    return metrics, (f"{dense.config.hybrid_override_pattern} -> {config.hybrid_override_pattern} + MTP "
                     f"'{config.mtp_hybrid_override_pattern}', {config.n_routed_experts} experts top-"
                     f"{config.num_experts_per_tok}, {params / 1e6:.2f}M params; max |logit diff| vs dense "
                     f"{metrics['max_logit_diff']:.1e}")


def check(metrics: dict) -> str | None:
    if not metrics["max_logit_diff"] <= MAX_LOGIT_DIFF:
        return f"the upcycled model differs from the dense one by {metrics['max_logit_diff']:.2e} > {MAX_LOGIT_DIFF}"
    if metrics["experts"] < 2:
        return f"the upcycled model has {metrics['experts']} routed experts"
    return None
