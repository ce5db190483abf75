"""Synthetic data generated in code, so the quickstart needs no download and its losses fall fast.

* pretraining text: lines of small-number arithmetic (``7 * 3 = 21.``) and counting runs (``12 13 14 15``);
  both are learnable within a minute, and counting makes the token after next predictable, which is what the
  MTP head learns;
* SFT chats: the questions of the GRPO math environment (``What is 3/4 + 4/3? Give the exact answer as
  \\boxed{...}.``) with a worked reasoning line and a ``\\boxed{}`` answer, so SFT teaches the format that the
  math reward reads.

Every function takes a seed; training and held-out sets use different seeds.
"""

from __future__ import annotations

import random
from fractions import Fraction

import torch
from datasets import Dataset

from ..trainers.environments import MathEnvironment

__all__ = ["pretraining_lines", "pretraining_dataset", "sft_conversations", "counting_prompt"]


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {value}."


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 40)
    return " ".join(str(i) for i in range(start, start + rng.randint(6, 12))) + "."


def pretraining_lines(n: int, seed: int) -> list[str]:
    """``n`` lines, half arithmetic, half counting."""
    rng = random.Random(seed)
    return [_arithmetic(rng) if rng.random() < 0.5 else _counting(rng) for _ in range(n)]


def pretraining_dataset(tokenizer, num_sequences: int, seq_len: int, seed: int) -> Dataset:
    """``num_sequences`` rows of exactly ``seq_len`` token ids (lines joined by newlines, then cut), for
    causal-LM training with ``labels = input_ids``."""
    lines = pretraining_lines(num_sequences * seq_len // 4 + 64, seed)
    ids = tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"]
    if len(ids) < num_sequences * seq_len:
        raise AssertionError("the synthetic corpus is shorter than asked; raise the line count")
    rows = [ids[i * seq_len:(i + 1) * seq_len] for i in range(num_sequences)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def _exact(answer: str) -> str:
    value = Fraction(answer)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def sft_conversations(n: int, seed: int) -> Dataset:
    """``n`` single-turn chats in the Nemotron 3 message format (``reasoning_content`` + ``content``)."""
    rng = random.Random(seed)
    env = MathEnvironment()
    rows = []
    for _ in range(n):
        task = env.sample_task(rng)
        answer = _exact(task["answer"])
        rows.append([
            {"role": "user", "content": env.prompt(task)},
            {"role": "assistant", "content": f"\\boxed{{{answer}}}",
             "reasoning_content": f"{task['question']} = {answer}"},
        ])
    return Dataset.from_dict({"messages": rows})


def counting_prompt(tokenizer, start: int, length: int = 6) -> torch.LongTensor:
    """``[1, n]`` ids of a counting run (``start start+1 ...``): a plain-text prompt for MTP decoding."""
    text = " ".join(str(i) for i in range(start, start + length))
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
