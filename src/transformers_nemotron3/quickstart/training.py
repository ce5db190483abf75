"""Causal-LM training with transformers' ``Trainer``: the pretraining and continued-pretraining stages."""

from __future__ import annotations

from transformers import Trainer, TrainingArguments

from ..trainers import ExpertBiasUpdateCallback, HistoryCallback
from .context import StageProgress, quiet_trainer

__all__ = ["train_causal_lm"]


def train_causal_lm(ctx, stage: str, model, dataset, steps: int, learning_rate: float,
                    expert_bias: bool = False, callbacks=()) -> list[dict]:
    """Train ``model`` on ``dataset`` (``input_ids`` / ``labels``) for ``steps``; returns the log history.

    Cosine schedule with a short warm-up, batch ``size.batch_size``, CPU, no checkpoints. The loss is the
    model's own: next-token loss, plus the MTP loss (scaled by ``config.mtp_loss_scale``) when it has an MTP
    head. ``expert_bias``: aux-loss-free router balancing after each step. Curves go to ``out/<stage>/``.
    """
    if steps == 0:
        return []
    args = TrainingArguments(
        output_dir=ctx.stage_dir(stage), use_cpu=True, max_steps=steps, per_device_train_batch_size=ctx.size.batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
        logging_steps=max(1, steps // 30), report_to="none", save_strategy="no", disable_tqdm=True, seed=ctx.seed,
        dataloader_num_workers=0,
    )
    callbacks = [HistoryCallback(ctx.stage_dir(stage)), *callbacks]
    if expert_bias:
        callbacks.append(ExpertBiasUpdateCallback())
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    quiet_trainer(trainer, StageProgress(stage, keys=("loss",)))
    trainer.train()
    model.eval()
    return trainer.state.log_history
