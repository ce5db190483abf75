"""Stage ``continue``: continued pretraining of the upcycled MoE; the new MTP head learns the token after next.

``--nvfp4`` runs it in emulated NVFP4 (transformers_nemotron3.nvfp4.prepare_nvfp4, the Nemotron 3 Super layer
recipe) and returns to a plain model before saving. Check: the held-out MTP loss falls by at least 30 % and the
next-token loss does not rise by more than 5 %.
"""

from __future__ import annotations

from ..modeling import Nemotron3ForCausalLM
from .data import pretraining_dataset
from .evaluate import text_losses
from .models import require_model, require_tokenizer
from .stage_pretrain import held_out
from .training import train_causal_lm

NAME = "continue"
MAX_MTP_RATIO = 0.7
MAX_LM_RISE = 1.05


def run(ctx) -> tuple[dict, str]:
    tokenizer = require_tokenizer(ctx)
    model = require_model(ctx)
    steps = ctx.steps(NAME, ctx.size.continue_steps)
    data = pretraining_dataset(tokenizer, steps * ctx.size.batch_size or 1, ctx.size.seq_len, seed=ctx.seed + 1)
    ids = held_out(ctx)
    before = text_losses(model, ids)
    nvfp4_layers = None
    if ctx.nvfp4:
        from ..nvfp4 import prepare_nvfp4

        prepare_nvfp4(model, backend="emulation")
        nvfp4_layers = sum(d.precision == "nvfp4" for d in model.nvfp4_plan)
    train_causal_lm(ctx, NAME, model, data, steps, learning_rate=2e-3, expert_bias=True)
    if ctx.nvfp4:  # the trained weights, in a plain model (NVFP4 is a training-time emulation)
        plain = Nemotron3ForCausalLM(model.config)
        plain.load_state_dict(model.state_dict())
        model = ctx.model = plain.eval()
    after = text_losses(model, ids)
    metrics = {"loss_before": before["lm"], "loss_after": after["lm"], "mtp_loss_before": before["mtp"],
               "mtp_loss_after": after["mtp"], "steps": steps, "nvfp4": ctx.nvfp4}
    precision = f"NVFP4 emulation ({nvfp4_layers} GEMM modules)" if ctx.nvfp4 else "fp32"
    return metrics, (f"{steps} steps in {precision}: held-out loss {before['lm']:.3f} -> {after['lm']:.3f}, "
                     f"MTP loss {before['mtp']:.3f} -> {after['mtp']:.3f}")


def check(metrics: dict) -> str | None:
    if not metrics["mtp_loss_after"] <= MAX_MTP_RATIO * metrics["mtp_loss_before"]:
        return (f"MTP loss {metrics['mtp_loss_before']:.3f} -> {metrics['mtp_loss_after']:.3f} did not fall to "
                f"{MAX_MTP_RATIO:.0%} of its start")
    if not metrics["loss_after"] <= MAX_LM_RISE * metrics["loss_before"]:
        return f"next-token loss rose {metrics['loss_before']:.3f} -> {metrics['loss_after']:.3f}"
    return None
