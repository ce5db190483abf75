"""The tokenizer and the models the stages start from when an earlier stage did not run."""

from __future__ import annotations

import torch

from ..modeling import Nemotron3Config, Nemotron3ForCausalLM
from ..tokenizer import build_tiny_tokenizer
from .data import pretraining_lines
from .sizes import QuickstartSize

__all__ = ["tokenizer_for", "dense_model", "with_mtp_head", "require_tokenizer", "require_model"]

MTP_PATTERN = "*E"  # the MTP head of Super / Ultra: one attention block, one MoE block


def tokenizer_for(size: QuickstartSize, seed: int):
    """A byte-level BPE with the Nemotron 3 special tokens and chat template, trained on the synthetic text."""
    return build_tiny_tokenizer(vocab_size=size.vocab_size, extra_texts=pretraining_lines(400, seed + 7))


def dense_model(size: QuickstartSize, tokenizer, seed: int) -> Nemotron3ForCausalLM:
    """A dense hybrid Nemotron-H (Mamba-2, attention, MLP; no experts), randomly initialised."""
    torch.manual_seed(seed)
    config = Nemotron3Config(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, hybrid_override_pattern=size.dense_pattern,
        num_attention_heads=size.num_attention_heads, num_key_value_heads=size.num_key_value_heads,
        head_dim=size.head_dim, mamba_num_heads=size.mamba_num_heads, mamba_head_dim=size.mamba_head_dim,
        n_groups=1, ssm_state_size=size.ssm_state_size, chunk_size=16, intermediate_size=size.intermediate_size,
        tie_word_embeddings=False, initializer_range=0.02, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id,
                                                          tokenizer.convert_tokens_to_ids("<|im_end|>")],
    )
    return Nemotron3ForCausalLM(config)


def with_mtp_head(model: Nemotron3ForCausalLM, seed: int) -> tuple[Nemotron3ForCausalLM, list[str]]:
    """``model`` plus a freshly initialised MTP head (pattern ``*E``); every other weight is copied.

    Returns the new model and the names of the new (MTP) parameters.
    """
    fields = {**model.config.to_dict(), "num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": MTP_PATTERN}
    fields.pop("mtp_layers_block_type", None)
    torch.manual_seed(seed)
    new = Nemotron3ForCausalLM(Nemotron3Config(**fields))
    result = new.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith("mtp.") for k in result.missing_keys), result.missing_keys
    return new.train(model.training), list(result.missing_keys)


def require_tokenizer(ctx):
    if ctx.tokenizer is None:
        ctx.tokenizer = tokenizer_for(ctx.size, ctx.seed)
    return ctx.tokenizer


def require_model(ctx):
    """The current model; when no earlier stage made one, an untrained upcycled MoE with an MTP head."""
    if ctx.model is None:
        from ..upcycling import upcycle

        dense = ctx.dense if ctx.dense is not None else dense_model(ctx.size, require_tokenizer(ctx), ctx.seed)
        moe = upcycle(dense, num_experts=ctx.size.num_experts, granularity=ctx.size.granularity,
                      top_k=ctx.size.top_k, seed=ctx.seed)
        ctx.model, _ = with_mtp_head(moe, ctx.seed)
    return ctx.model
