"""Supervised fine-tuning for Nemotron 3: a thin subclass of TRL's ``SFTTrainer``.

What it adds on top of TRL (each a narrow override):

* the chat template released with the checkpoints: a tokenizer that carries one keeps it, one without gets the
  released Nano template (``chat_template_family`` picks Super / Ultra, or replaces the tokenizer's). For
  ``assistant_only_loss`` TRL then swaps in its training variant (``get_training_chat_template``: the same text
  with ``{% generation %}`` markers);
* a mix of thinking-on and thinking-off examples: a fraction ``thinking_off_ratio`` of conversations
  (chosen by a seeded coin per example) lose their reasoning, which renders as ``<think></think>``;
* history-thinking truncation (``truncate_history_thinking``, passed to the template per example);
* the loss from the model's own forward: LM loss + MoE auxiliary loss (``config.moe_aux_loss_coef``)
  + ``mtp_loss_scale`` * MTP loss. TRL's fused LM head only sees the backbone and would drop the last two;
* aux-loss-free balancing: ``ExpertBiasUpdateCallback`` calls ``model.update_expert_bias`` every step;
* padding-free packing: TRL's collator emits ``position_ids`` restarting at 0 and ``seq_idx`` without an
  attention mask; the model keeps Mamba state and attention of packed sequences apart, so packed and
  unpacked batches give the same loss.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch
from trl import SFTConfig, SFTTrainer

from ..generation.chat_template import CHAT_TEMPLATE_FAMILIES, released_chat_template
from .callbacks import ExpertBiasUpdateCallback
from .compat import prepare_model_for_trl
from .metrics import component_loss_entries, token_accuracy_entry
from .parallel import Nemotron3ParallelTrainerMixin, as_parallel_config, parallel_config_to_dict

__all__ = ["Nemotron3SFTConfig", "Nemotron3SFTTrainer", "apply_thinking_mode"]

_THINK = re.compile(r"<think>.*?</think>\n?", re.DOTALL)


@dataclass
class Nemotron3SFTConfig(SFTConfig):
    """``SFTConfig`` with Nemotron 3 defaults and options.

    Args:
        thinking_off_ratio: fraction of conversations trained with thinking off (reasoning removed,
            rendered ``<think></think>``). 0 keeps every example as given.
        thinking_mix_seed: seed of the per-example thinking on/off coin.
        truncate_history_thinking: drop the reasoning of assistant turns before the last user turn.
        chat_template_family: "nano", "super" or "ultra": the tokenizer gets that family's released chat template
            (replacing its own). None: keep the tokenizer's template, or the Nano one if it has none.
        update_expert_bias: call ``model.update_expert_bias`` after every optimizer step.
        expert_bias_update_rate: rate for that update; None uses ``config.moe_bias_update_rate``.
        parallel_config: a `Nemotron3ParallelConfig` (or a dict of its fields, or that dict as JSON): expert / context parallelism
            applied to the model before ``Trainer`` wraps it (see trainers/parallel.py, docs/parallelism.md).
    """

    assistant_only_loss: bool = field(default=True, metadata={"help": "Train only on assistant tokens."})
    thinking_off_ratio: float = field(default=0.0, metadata={"help": "Fraction of examples with thinking off."})
    thinking_mix_seed: int = field(default=0, metadata={"help": "Seed of the thinking on/off coin."})
    truncate_history_thinking: bool = field(default=True, metadata={"help": "Drop reasoning of earlier turns."})
    chat_template_family: str | None = field(default=None, metadata={
        "help": "nano / super / ultra: use that released chat template. None: the tokenizer's own, else nano."})
    update_expert_bias: bool = field(default=True, metadata={"help": "Aux-loss-free expert-bias update each step."})
    expert_bias_update_rate: float | None = field(default=None, metadata={"help": "None: config value."})
    parallel_config: dict | str | None = field(default=None, metadata={
        "help": "Nemotron3ParallelConfig, dict or JSON string: expert_parallel_size, context_parallel_size, ..."})

    def __post_init__(self):
        if not 0.0 <= self.thinking_off_ratio <= 1.0:
            raise ValueError(f"thinking_off_ratio={self.thinking_off_ratio} must be in [0, 1]")
        if self.chat_template_family is not None and self.chat_template_family not in CHAT_TEMPLATE_FAMILIES:
            raise ValueError(f"chat_template_family={self.chat_template_family!r}; use one of {CHAT_TEMPLATE_FAMILIES}")
        if self.chat_template_family is not None and self.chat_template_path is not None:
            raise ValueError("chat_template_family and chat_template_path are both set; choose one")
        self.parallel_config = as_parallel_config(self.parallel_config)
        super().__post_init__()

    def to_dict(self):
        d = super().to_dict()
        d["parallel_config"] = parallel_config_to_dict(d.get("parallel_config"))
        return d


def apply_thinking_mode(messages: list[dict], thinking: bool) -> list[dict]:
    """Copy of ``messages``; with ``thinking=False`` every assistant turn loses its reasoning.

    Reasoning may sit in ``reasoning_content`` or inline as ``<think>...</think>`` in ``content``; both go,
    so the released templates render the turn as ``<think></think>{content}``.
    """
    out = []
    for message in messages:
        message = dict(message)
        if not thinking and message.get("role") == "assistant":
            if "reasoning_content" in message:
                message["reasoning_content"] = ""
            if isinstance(message.get("content"), str):
                message["content"] = _THINK.sub("", message["content"])
        out.append(message)
    return out


class Nemotron3SFTTrainer(Nemotron3ParallelTrainerMixin, SFTTrainer):
    """``SFTTrainer`` for Nemotron 3 (see the module docstring for what differs from TRL)."""

    def __init__(self, model, args: Nemotron3SFTConfig | None = None, processing_class=None, callbacks=None,
                 **kwargs):
        if args is None:
            args = Nemotron3SFTConfig(output_dir="nemotron3-sft")
        if not isinstance(args, Nemotron3SFTConfig):
            raise ValueError(f"args must be a Nemotron3SFTConfig, got {type(args).__name__}")
        if args.chat_template_family is not None:
            if processing_class is None:
                raise ValueError("chat_template_family needs the tokenizer: pass processing_class=")
            processing_class.chat_template = released_chat_template(args.chat_template_family)
        elif (processing_class is not None and args.chat_template_path is None
              and getattr(processing_class, "chat_template", None) is None):
            processing_class.chat_template = released_chat_template("nano")
        callbacks = list(callbacks or [])
        if args.update_expert_bias:
            callbacks.append(ExpertBiasUpdateCallback(args.expert_bias_update_rate,
                                                      sync_loads=args.parallel_config is None))
        model = self._setup_nemotron3_parallel(model, args, callbacks)  # EP / CP before Trainer wraps the model
        with prepare_model_for_trl(model, args):
            super().__init__(model, args=args, processing_class=processing_class, callbacks=callbacks, **kwargs)
        self._finish_nemotron3_parallel()

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = dataset.column_names or []
        if "messages" in columns and "input_ids" not in columns:
            dataset = dataset.map(self._thinking_mix, with_indices=True,
                                  fn_kwargs={"args": args}, desc=f"Thinking mix ({dataset_name})")
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    @staticmethod
    def _thinking_mix(example, index, args):
        thinking = random.Random(args.thinking_mix_seed * 1_000_003 + index).random() >= args.thinking_off_ratio
        kwargs = dict(example.get("chat_template_kwargs") or {})
        kwargs.update(enable_thinking=thinking, truncate_history_thinking=args.truncate_history_thinking)
        return {"messages": apply_thinking_mode(example["messages"], thinking), "chat_template_kwargs": kwargs}

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own loss: LM (+ aux when ``moe_aux_loss_coef`` > 0) (+ scaled MTP when it has MTP)."""
        mode = "train" if self.model.training else "eval"
        inputs = {k: v for k, v in inputs.items()
                  if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
        inputs["use_cache"] = False
        context_parallel = self.nemotron3_parallel is not None and self.nemotron3_parallel.config.cp > 1
        accumulation_steps = getattr(self, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
        if context_parallel:  # loss already scaled for DDP's mean; logits are this rank's zig-zag tokens
            outputs = self.parallel_forward(model, inputs, num_items_in_batch)
            loss = outputs.loss
        else:
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
            loss = outputs.loss
            if num_items_in_batch is not None:
                loss = self._scale_for_token_mean(loss, outputs.aux_loss, accumulation_steps)
        # logged parts: global over processes, following Trainer's `loss` (see trainers/metrics.py)
        for name, value in component_loss_entries(
                self.accelerator, outputs, num_items_in_batch, self.args.average_tokens_across_devices,
                accumulation_steps).items():
            self._metrics[mode][name].append(value)
        labels = inputs["labels"]
        if mode == "train":
            count = torch.tensor(float(labels[:, 1:].numel()), device=labels.device)
            self._total_train_tokens += int(self.accelerator.gather(count[None]).sum().item())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if not context_parallel:
            self._metrics[mode]["mean_token_accuracy"].append(
                token_accuracy_entry(self.accelerator, outputs.logits, labels))
        return (loss, outputs) if return_outputs else loss

    def _scale_for_token_mean(self, loss, aux_loss, accumulation_steps: int):
        """``loss`` was normalised by the step's token count (``num_items_in_batch``), as TRL's SFT loss.

        As in TRL: the token-mean parts are multiplied by the world size when the count covers every rank
        (DDP then averages the gradients), and the aux loss, a per-micro-batch mean, is divided by the
        accumulation steps instead (Trainer no longer divides a loss normalised by ``num_items_in_batch``).
        """
        aux = aux_loss if aux_loss is not None else torch.zeros_like(loss)
        token_mean = loss - aux
        if self.args.average_tokens_across_devices:
            token_mean = token_mean * self.accelerator.num_processes
        return token_mean + aux / accumulation_steps
