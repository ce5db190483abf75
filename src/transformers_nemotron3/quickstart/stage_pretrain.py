"""Stage ``pretrain``: a dense hybrid Nemotron-H (Mamba-2 + attention + MLP) learns the synthetic text.

Check: the held-out next-token loss at least halves.
"""

from __future__ import annotations

import torch

from .data import pretraining_dataset
from .evaluate import text_losses
from .models import dense_model, require_tokenizer
from .training import train_causal_lm

NAME = "pretrain"
MAX_LOSS_RATIO = 0.5


def held_out(ctx) -> torch.LongTensor:
    """Fixed held-out pretraining sequences (a seed no training set uses)."""
    rows = pretraining_dataset(ctx.tokenizer, 16, ctx.size.seq_len, seed=ctx.seed + 1000)["input_ids"]
    return torch.tensor(rows)


def run(ctx) -> tuple[dict, str]:
    tokenizer = require_tokenizer(ctx)
    model = dense_model(ctx.size, tokenizer, ctx.seed)
    steps = ctx.steps(NAME, ctx.size.pretrain_steps)
    data = pretraining_dataset(tokenizer, steps * ctx.size.batch_size or 1, ctx.size.seq_len, seed=ctx.seed)
    before = text_losses(model, held_out(ctx))["lm"]
    train_causal_lm(ctx, NAME, model, data, steps, learning_rate=3e-3)
    after = text_losses(model, held_out(ctx))["lm"]
    ctx.dense = model
    params = sum(p.numel() for p in model.parameters())
    metrics = {"loss_before": before, "loss_after": after, "steps": steps, "params": params,
               "pattern": model.config.hybrid_override_pattern}
    return metrics, (f"dense {model.config.hybrid_override_pattern} ({params / 1e6:.2f}M params), {steps} steps: "
                     f"held-out loss {before:.3f} -> {after:.3f}")


def check(metrics: dict) -> str | None:
    if not metrics["loss_after"] <= MAX_LOSS_RATIO * metrics["loss_before"]:
        return (f"held-out loss {metrics['loss_before']:.3f} -> {metrics['loss_after']:.3f} did not fall to "
                f"{MAX_LOSS_RATIO:.0%} of its start")
    return None
