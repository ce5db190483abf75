"""Held-out measurements the stages check: language-model and MTP loss on text, assistant loss on chats."""

from __future__ import annotations

import torch

__all__ = ["text_losses", "chat_loss", "reasoning_length"]


@torch.no_grad()
def text_losses(model, input_ids: torch.LongTensor) -> dict[str, float]:
    """Mean next-token loss (``lm``) and, when the model has an MTP head, its token-after-next loss (``mtp``).

    The forward runs in training mode (the model computes the MTP loss only then) without gradients; the
    expert loads it counts are dropped afterwards (``update_expert_bias(0.0)``), so evaluating does not
    steer the routers.
    """
    was_training = model.training
    model.train()
    try:
        out = model(input_ids=input_ids, labels=input_ids)
    finally:
        model.update_expert_bias(0.0)
        model.train(was_training)
    losses = {"lm": float(out.lm_loss if out.lm_loss is not None else out.loss)}
    if out.mtp_loss is not None:
        losses["mtp"] = float(out.mtp_loss)
    return losses


@torch.no_grad()
def chat_loss(model, tokenizer, conversations: list[list[dict]], enable_thinking: bool) -> float:
    """Mean loss on the assistant tokens of ``conversations`` rendered by the tokenizer's chat template.

    With ``enable_thinking=False`` the reasoning is dropped, so the answer follows ``<think></think>``.
    The assistant tokens are the ``{% generation %}`` spans of the released template's training variant
    (``return_assistant_tokens_mask``), the same tokens SFT trains on.
    """
    from ..generation.chat_template import chat_template_family, training_chat_template

    # the released template's training variant (TRL's), the one with {% generation %} spans SFT trains on
    template = training_chat_template(chat_template_family(tokenizer.chat_template) or "nano")
    model.eval()
    total, count = 0.0, 0
    for messages in conversations:
        if not enable_thinking:
            messages = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, enable_thinking=enable_thinking,
                                            return_assistant_tokens_mask=True, chat_template=template)
        ids = torch.tensor([enc["input_ids"]])
        mask = torch.tensor([enc["assistant_masks"]], dtype=torch.bool)
        if not mask.any():
            raise AssertionError("the chat template marks no assistant tokens; it needs {% generation %} markers")
        labels = ids.masked_fill(~mask, -100)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        total, count = total + float(loss), count + int(mask[:, 1:].sum())
    return total / count


def reasoning_length(token_ids: list[int], end_id: int) -> int:
    """Tokens generated before ``</think>`` (all of them when it never came)."""
    return token_ids.index(end_id) if end_id in token_ids else len(token_ids)
