"""Cap the length of a reasoning trace during ``generate``.

``ThinkingBudgetLogitsProcessor`` works like NVIDIA's budget processors for vLLM and NIM: it
counts the tokens after the last ``<think>`` of each row; once ``thinking_budget`` is reached
it lets the model run on for up to ``grace_period`` tokens, hoping for a token that contains a
newline (a natural place to stop), then forces the ``</think>`` token sequence one token per
step, optionally followed by a newline. Rows that have no open ``<think>`` (thinking off: the
prompt ends with ``<think></think>``) or that already closed it are left alone.

The processor keeps no state between calls: everything is read from ``input_ids``, so one
instance serves any batch, beam search and repeated ``generate`` calls.

Counting: every token after ``<think>`` counts, including the ``\\n`` that the chat template
puts after ``<think>`` in the prompt. With budget N and grace G the forced ``</think>`` starts
at most N + G tokens after ``<think>``.

To end the turn the way the released templates write one (``chat_template.py``): Nano and Super
put ``\\n`` before and after ``</think>``, so give a ``grace_period`` (the stop then lands on a
newline) and ``append_newline=True``; Ultra writes ``{reasoning}</think>{answer}``, so keep
``append_newline=False``. The test suite checks that a turn ended this way renders back byte for
byte through each family's template.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import LogitsProcessor

__all__ = ["ThinkingBudgetLogitsProcessor"]


def _find_last(sequence: list[int], pattern: list[int]) -> int:
    """Index just after the last occurrence of ``pattern`` in ``sequence``, or -1."""
    n, first = len(pattern), pattern[0]
    for end in range(len(sequence), n - 1, -1):
        if sequence[end - n] == first and sequence[end - n : end] == pattern:
            return end
    return -1


def _contains(sequence: list[int], pattern: list[int]) -> bool:
    n, first = len(pattern), pattern[0]
    return any(
        sequence[i] == first and sequence[i : i + n] == pattern for i in range(len(sequence) - n + 1)
    )


class ThinkingBudgetLogitsProcessor(LogitsProcessor):
    """Force ``</think>`` after ``thinking_budget`` reasoning tokens (plus a newline grace).

    Args:
        thinking_budget: reasoning tokens allowed before the processor starts looking for an
            end (>= 0).
        grace_period: extra tokens allowed after the budget while waiting for a token that
            contains a newline (>= 0).
        tokenizer: used to look up the ids of ``<think>``, ``</think>``, ``"\\n"`` and of every
            token whose text contains a newline. Explicit ids below take precedence.
        start_token_ids: token ids of ``<think>``.
        end_token_ids: token ids of ``</think>`` (may be several tokens).
        newline_token_ids: ids that count as "a token containing a newline" for the grace
            period. Required when ``grace_period > 0`` and no tokenizer is given.
        append_newline: after a forced ``</think>``, also force ``newline_token_id``.
        newline_token_id: the id of ``"\\n"``, needed when ``append_newline`` is set.

    Example::

        processor = ThinkingBudgetLogitsProcessor(256, grace_period=32, tokenizer=tokenizer)
        model.generate(**inputs, logits_processor=LogitsProcessorList([processor]))
    """

    def __init__(
        self,
        thinking_budget: int,
        grace_period: int = 0,
        *,
        tokenizer: Any = None,
        start_token_ids: Sequence[int] | None = None,
        end_token_ids: Sequence[int] | None = None,
        newline_token_ids: Sequence[int] | None = None,
        append_newline: bool = False,
        newline_token_id: int | None = None,
    ) -> None:
        if not isinstance(thinking_budget, int) or thinking_budget < 0:
            raise ValueError(f"thinking_budget={thinking_budget!r}; pass an int >= 0")
        if not isinstance(grace_period, int) or grace_period < 0:
            raise ValueError(f"grace_period={grace_period!r}; pass an int >= 0")

        def encode(text: str) -> list[int]:
            if tokenizer is None:
                raise ValueError(f"no token ids for {text!r}; pass tokenizer= or the *_token_ids arguments")
            return list(tokenizer.encode(text, add_special_tokens=False))

        self.thinking_budget = thinking_budget
        self.grace_period = grace_period
        self.start_token_ids = list(start_token_ids) if start_token_ids is not None else encode("<think>")
        self.end_token_ids = list(end_token_ids) if end_token_ids is not None else encode("</think>")
        if not self.start_token_ids or not self.end_token_ids:
            raise ValueError("start_token_ids and end_token_ids must not be empty")

        if newline_token_ids is None and tokenizer is not None:
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            newline_token_ids = [i for i, text in enumerate(texts) if "\n" in text]
        self.newline_token_ids = set(newline_token_ids or [])
        if grace_period > 0 and not self.newline_token_ids:
            raise ValueError(
                f"grace_period={grace_period} needs newline token ids to wait for; "
                "pass tokenizer= or newline_token_ids="
            )

        if append_newline and newline_token_id is None:
            ids = encode("\n")
            if len(ids) != 1:
                raise ValueError(f'"\\n" encodes to {ids}, not one token; pass newline_token_id=')
            newline_token_id = ids[0]
        self.forced_token_ids = self.end_token_ids + ([newline_token_id] if append_newline else [])

    def next_forced_token(self, row: list[int]) -> int | None:
        """The token this row must produce next, or None to leave its scores alone."""
        start = _find_last(row, self.start_token_ids)
        if start < 0:
            return None
        tail = row[start:]
        forced = self.forced_token_ids
        # Finish a forced sequence that is under way (it began at or after the budget).
        for k in range(len(forced) - 1, 0, -1):
            if tail[-k:] == forced[:k] and len(tail) - k >= self.thinking_budget:
                return forced[k]
        if _contains(tail, self.end_token_ids):
            return None  # thinking already closed (or was off)
        used = len(tail)
        if used < self.thinking_budget:
            return None
        at_newline = bool(tail) and tail[-1] in self.newline_token_ids
        if used - self.thinking_budget >= self.grace_period or at_newline:
            return forced[0]
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = [self.next_forced_token(row) for row in input_ids.tolist()]
        if all(token is None for token in forced):
            return scores
        scores = scores.clone()
        for i, token in enumerate(forced):
            if token is not None:
                scores[i] = float("-inf")
                scores[i, token] = 0.0
        return scores
