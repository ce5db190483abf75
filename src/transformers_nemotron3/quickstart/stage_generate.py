"""Stage ``generate``: reasoning on and off, a thinking budget, and MTP self-speculative decoding.

* thinking budget: a math question with thinking on is answered greedily without a cap, then with
  ``ThinkingBudgetLogitsProcessor`` set to half the uncapped reasoning length; the capped run must close
  ``</think>`` within the budget;
* MTP: ``mtp_generate`` (``model.generate(..., use_mtp=True)`` underneath) drafts 2 tokens per step with the
  trained MTP head and verifies them in one forward. It must produce exactly the plain greedy tokens, with a
  mean acceptance length (tokens per main-model forward) of at least 1.2 and above that of the same model with
  its MTP head reset to initialisation; tokens/s of both are reported.
"""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessorList

from ..generation import ThinkingBudgetLogitsProcessor, mtp_generate
from .data import counting_prompt, sft_conversations
from .evaluate import reasoning_length
from .models import require_model, require_tokenizer

NAME = "generate"
NEW_TOKENS = 32
DRAFT_TOKENS = 2
MIN_ACCEPTANCE = 1.2


def _chat_prompt(tokenizer, question: str, thinking: bool) -> torch.LongTensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         enable_thinking=thinking, return_tensors="pt", return_dict=True)["input_ids"]


def _new_tokens(model, prompt, processors=None, max_new_tokens=NEW_TOKENS) -> list[int]:
    out = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors)
    return out[0, prompt.shape[1]:].tolist()


def _with_fresh_mtp_head(model, seed: int):
    """A copy of ``model`` whose MTP head is freshly initialised (the baseline a trained head must beat)."""
    torch.manual_seed(seed)
    fresh = type(model)(model.config).eval()
    result = fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")},
                                   strict=False)
    assert result.missing_keys and all(k.startswith("mtp.") for k in result.missing_keys), result.missing_keys
    return fresh


@torch.no_grad()
def run(ctx) -> tuple[dict, str]:
    tokenizer = require_tokenizer(ctx)
    model = require_model(ctx).eval()
    question = sft_conversations(1, seed=ctx.seed + 3000)["messages"][0][0]["content"]
    end_think = tokenizer.convert_tokens_to_ids("</think>")

    free = _new_tokens(model, _chat_prompt(tokenizer, question, True))
    free_len = reasoning_length(free, end_think)
    budget = max(1, free_len // 2)
    processor = ThinkingBudgetLogitsProcessor(budget, tokenizer=tokenizer)
    capped = _new_tokens(model, _chat_prompt(tokenizer, question, True), LogitsProcessorList([processor]))
    capped_len = reasoning_length(capped, end_think)
    no_think = _new_tokens(model, _chat_prompt(tokenizer, question, False))
    samples = {"question": question, "thinking_on": tokenizer.decode(free),
               f"thinking_budget_{budget}": tokenizer.decode(capped), "thinking_off": tokenizer.decode(no_think)}

    chats = sft_conversations(2, ctx.seed + 4000)["messages"]
    prompts = [_chat_prompt(tokenizer, chat[0]["content"], False) for chat in chats]
    prompts += [counting_prompt(tokenizer, start) for start in (3, 17)]
    for drafts in (0, DRAFT_TOKENS):  # warm-up: first calls build caches and plans
        mtp_generate(model, prompts[0], 4, num_draft_tokens=drafts)
    plain_s = mtp_s = 0.0
    lengths, same, produced = [], True, 0
    for prompt in prompts:  # plain greedy (the same cached loop, no drafts) and MTP, timed back to back
        t = time.perf_counter()
        plain = mtp_generate(model, prompt, NEW_TOKENS, num_draft_tokens=0)
        plain_s += time.perf_counter() - t
        t = time.perf_counter()
        drafted, stats = mtp_generate(model, prompt, NEW_TOKENS, num_draft_tokens=DRAFT_TOKENS, return_stats=True)
        mtp_s += time.perf_counter() - t
        same &= torch.equal(plain, drafted)
        lengths.append(stats["mean_acceptance_length"])
        produced += drafted.shape[1] - prompt.shape[1]
    untrained = _with_fresh_mtp_head(model, ctx.seed)  # the same model, its MTP head back to initialisation
    untrained_lengths = [mtp_generate(untrained, prompt, NEW_TOKENS, num_draft_tokens=DRAFT_TOKENS,
                                      return_stats=True)[1]["mean_acceptance_length"] for prompt in prompts]
    via_generate = model.generate(prompts[-1], max_new_tokens=NEW_TOKENS, do_sample=False, use_mtp=True,
                                  num_draft_tokens=DRAFT_TOKENS)
    same &= torch.equal(via_generate, model.generate(prompts[-1], max_new_tokens=NEW_TOKENS, do_sample=False))
    metrics = {"reasoning_tokens_free": free_len, "thinking_budget": budget, "reasoning_tokens_capped": capped_len,
               "acceptance_length": sum(lengths) / len(lengths), "mtp_equals_greedy": bool(same),
               "acceptance_length_untrained_head": sum(untrained_lengths) / len(untrained_lengths),
               "tokens_per_s_plain": produced / plain_s, "tokens_per_s_mtp": produced / mtp_s, "samples": samples}
    return metrics, (f"reasoning {free_len} tokens free, {capped_len} with budget {budget}; MTP ({DRAFT_TOKENS} "
                     f"drafts) acceptance length {metrics['acceptance_length']:.2f} (untrained head "
                     f"{metrics['acceptance_length_untrained_head']:.2f}), "
                     f"{metrics['tokens_per_s_mtp']:.0f} vs {metrics['tokens_per_s_plain']:.0f} tok/s plain, "
                     f"same tokens as greedy: {same}")


def check(metrics: dict) -> str | None:
    if not metrics["reasoning_tokens_capped"] <= metrics["thinking_budget"]:
        return (f"with a thinking budget of {metrics['thinking_budget']} the model reasoned for "
                f"{metrics['reasoning_tokens_capped']} tokens")
    if not metrics["mtp_equals_greedy"]:
        return "MTP speculative decoding produced different tokens than greedy decoding"
    if not metrics["acceptance_length"] >= MIN_ACCEPTANCE:
        return f"MTP mean acceptance length {metrics['acceptance_length']:.2f} < {MIN_ACCEPTANCE}"
    if not metrics["acceptance_length"] > metrics["acceptance_length_untrained_head"]:
        return (f"the trained MTP head's acceptance length {metrics['acceptance_length']:.2f} is no better than an "
                f"untrained head's {metrics['acceptance_length_untrained_head']:.2f}")
    return None
