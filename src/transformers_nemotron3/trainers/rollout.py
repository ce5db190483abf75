"""Multi-environment, multi-turn rollouts for GRPO (TRL's ``rollout_func`` contract).

For each row of the batch (one completion per row: TRL repeats every prompt ``num_generations`` times),
``MultiEnvRollout`` creates a fresh environment instance, renders the opening messages with the tokenizer's chat
template (a released Nemotron 3 one), and then alternates:

1. sample one assistant turn for all unfinished rows in one batched ``generate`` call (left padding,
   ``<|im_end|>`` / ``</s>`` stop, the thinking budget as a logits processor);
2. give each turn to its environment; tool results come back as a ``user`` turn of ``<tool_response>``
   blocks followed by a fresh generation prompt. Those tokens join the completion with ``env_mask`` 0, so
   the policy loss ignores them.

It returns ``prompt_ids``, ``completion_ids``, ``logprobs`` (of the sampled tokens under the processed
distribution, 0 on environment tokens), ``env_mask`` and, for the reward functions and metrics,
``env_reward``, ``env_turns`` and ``env_model_tokens``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import torch
from transformers import LogitsProcessorList

from ..generation.thinking_budget import ThinkingBudgetLogitsProcessor
from ..tokenizer import end_of_turn_token_ids
from .environments.base import Environment

__all__ = ["MultiEnvRollout", "tool_turn_text"]


def tool_turn_text(observations: list[dict], enable_thinking: bool) -> str:
    """The text between an assistant turn's ``<|im_end|>`` and the next assistant turn's first token.

    The same for the released Nano, Super and Ultra templates (modeling_tests/test_chat_template.py checks it).
    """
    body = "".join(f"<tool_response>\n{o['content']}\n</tool_response>\n" for o in observations)
    think = "<think>\n" if enable_thinking else "<think></think>"
    return f"\n<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n{think}"


class MultiEnvRollout:
    """Callable ``rollout_func(prompts, trainer)``; reads each row's ``environment`` and ``task``.

    Args:
        environments: name -> factory returning a fresh :class:`Environment` (a class works).
        max_completion_length: token budget of the whole completion (all turns and tool results).
        enable_thinking: open every assistant turn with ``<think>\\n`` (on) or ``<think></think>`` (off).
        thinking_budget: cap on reasoning tokens per turn (None: no cap), enforced by
            :class:`ThinkingBudgetLogitsProcessor`; ``thinking_grace_period`` extra tokens to end on a newline.
        temperature, top_p: sampling parameters.
    """

    def __init__(self, environments: Mapping[str, Callable[[], Environment]], max_completion_length: int = 64,
                 enable_thinking: bool = False, thinking_budget: int | None = None, thinking_grace_period: int = 0,
                 temperature: float = 1.0, top_p: float = 1.0) -> None:
        if not environments:
            raise ValueError("environments is empty; pass at least one {name: factory}")
        self.environments = dict(environments)
        self.max_completion_length = max_completion_length
        self.enable_thinking = enable_thinking
        self.thinking_budget = thinking_budget
        self.thinking_grace_period = thinking_grace_period
        self.temperature = temperature
        self.top_p = top_p
        self.rows: list[dict[str, Any]] | None = None  # set by the trainer before each generation

    # ------------------------------------------------------------------ helpers
    def _processors(self, tokenizer) -> LogitsProcessorList:
        if self.thinking_budget is None or not self.enable_thinking:
            return LogitsProcessorList()
        return LogitsProcessorList([ThinkingBudgetLogitsProcessor(
            self.thinking_budget, self.thinking_grace_period, tokenizer=tokenizer)])

    @torch.no_grad()
    def _generate(self, model, tokenizer, contexts: list[list[int]], max_new_tokens: int):
        """Sample one turn for each context; returns (new ids per row, their logprobs)."""
        pad = tokenizer.pad_token_id
        width = max(len(c) for c in contexts)
        input_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(contexts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        device = next(model.parameters()).device
        stops = end_of_turn_token_ids(tokenizer)  # </s> and <|im_end|>, where the tokenizer has them
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
            temperature=self.temperature, top_p=self.top_p, top_k=0, max_new_tokens=max_new_tokens,
            eos_token_id=stops, pad_token_id=pad, logits_processor=self._processors(tokenizer),
            output_scores=True, return_dict_in_generate=True,
        )
        new = out.sequences[:, width:].cpu()
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1).cpu()
        logps = scores.gather(-1, new[..., None]).squeeze(-1)
        results = []
        for row in range(len(contexts)):
            ids = new[row].tolist()
            end = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
            results.append((ids[:end], logps[row, :end].nan_to_num(neginf=0.0).tolist()))
        return results

    # ------------------------------------------------------------------ the rollout
    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        rows = self.rows
        if rows is None or len(rows) != len(prompts):
            raise ValueError("MultiEnvRollout needs the batch rows; use it through Nemotron3GRPOTrainer")
        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        think = "<think>\n" if self.enable_thinking else "<think></think>"
        im_end = tokenizer.get_vocab().get("<|im_end|>")

        envs, prompt_ids = [], []
        for row in rows:
            name = row["environment"]
            if name not in self.environments:
                raise ValueError(f"row has environment={name!r}; known: {sorted(self.environments)}")
            env = self.environments[name]()
            task = json.loads(row["task"]) if isinstance(row["task"], str) else row["task"]
            messages = env.reset(task)
            text = tokenizer.apply_chat_template(messages, tools=env.tools(), add_generation_prompt=True,
                                                 enable_thinking=self.enable_thinking, tokenize=False)
            envs.append(env)
            prompt_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])

        n = len(rows)
        completion = [[] for _ in range(n)]
        mask = [[] for _ in range(n)]
        logprobs = [[] for _ in range(n)]
        model_tokens = [0] * n
        turn_text = [think] * n
        active = list(range(n))
        was_training = model.training
        model.eval()
        try:
            while active:
                room = {i: self.max_completion_length - len(completion[i]) for i in active}
                turns = self._generate(model, tokenizer, [prompt_ids[i] + completion[i] for i in active],
                                       max(room.values()))
                still = []
                for i, (ids, lps) in zip(active, turns):
                    ids, lps = ids[:room[i]], lps[:room[i]]
                    completion[i] += ids
                    mask[i] += [1] * len(ids)
                    logprobs[i] += lps
                    model_tokens[i] += len(ids)
                    text = turn_text[i] + tokenizer.decode(ids, skip_special_tokens=False)
                    step = envs[i].step(text)
                    if step.done or not step.observations:
                        continue
                    glue = tool_turn_text(step.observations, self.enable_thinking)
                    if not ids or ids[-1] != im_end:
                        glue = "<|im_end|>" + glue
                    glue_ids = tokenizer(glue, add_special_tokens=False)["input_ids"]
                    if len(completion[i]) + len(glue_ids) >= self.max_completion_length:
                        continue  # no room for another turn: the episode ends without a final answer
                    completion[i] += glue_ids
                    mask[i] += [0] * len(glue_ids)
                    logprobs[i] += [0.0] * len(glue_ids)
                    turn_text[i] = think
                    still.append(i)
                active = still
        finally:
            model.train(was_training)

        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion,
            "logprobs": logprobs,
            "env_mask": mask,
            "env_reward": [env.reward() for env in envs],
            "env_turns": [env.turns for env in envs],
            "env_model_tokens": model_tokens,
        }
