"""Stage ``sft``: supervised fine-tuning on chats in the Nemotron 3 chat template, half of them thinking-off.

Uses ``Nemotron3SFTTrainer`` (TRL's SFTTrainer: assistant-only loss, padding-free packing, plus the MoE and MTP
losses). Check: the held-out assistant loss at least halves, with thinking on and with thinking off.
"""

from __future__ import annotations

from ..trainers import HistoryCallback, Nemotron3SFTConfig, Nemotron3SFTTrainer
from .context import StageProgress, quiet_trainer
from .data import sft_conversations
from .evaluate import chat_loss
from .models import require_model, require_tokenizer

NAME = "sft"
MAX_LOSS_RATIO = 0.5
HELD_OUT = 24


def run(ctx) -> tuple[dict, str]:
    tokenizer = require_tokenizer(ctx)
    model = require_model(ctx)
    steps = ctx.steps(NAME, ctx.size.sft_steps)
    held_out = sft_conversations(HELD_OUT, seed=ctx.seed + 2000)["messages"]
    before = {mode: chat_loss(model, tokenizer, held_out, mode) for mode in (True, False)}
    if steps:
        args = Nemotron3SFTConfig(
            output_dir=ctx.stage_dir(NAME), use_cpu=True, bf16=False, max_steps=steps, per_device_train_batch_size=4,
            learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), logging_steps=2,
            report_to="none", save_strategy="no", packing=True, max_length=256, thinking_off_ratio=0.5,
            thinking_mix_seed=ctx.seed, seed=ctx.seed, disable_tqdm=True, gradient_checkpointing=False,
            dataset_num_proc=None,
        )
        trainer = Nemotron3SFTTrainer(model=model, args=args, processing_class=tokenizer,
                                      train_dataset=sft_conversations(steps * 16, seed=ctx.seed),
                                      callbacks=[HistoryCallback(ctx.stage_dir(NAME))])
        quiet_trainer(trainer, StageProgress(NAME, keys=("loss",)))
        trainer.train()
    model.eval()
    after = {mode: chat_loss(model, tokenizer, held_out, mode) for mode in (True, False)}
    metrics = {"loss_before": before[True], "loss_after": after[True], "loss_before_no_think": before[False],
               "loss_after_no_think": after[False], "steps": steps}
    return metrics, (f"{steps} steps: assistant loss thinking on {before[True]:.3f} -> {after[True]:.3f}, "
                     f"thinking off {before[False]:.3f} -> {after[False]:.3f}")


def check(metrics: dict) -> str | None:
    for suffix, mode in (("", "thinking on"), ("_no_think", "thinking off")):
        b, a = metrics["loss_before" + suffix], metrics["loss_after" + suffix]
        if not a <= MAX_LOSS_RATIO * b:
            return f"{mode}: held-out assistant loss {b:.3f} -> {a:.3f} did not fall to {MAX_LOSS_RATIO:.0%}"
    return None
