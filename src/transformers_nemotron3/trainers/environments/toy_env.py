"""A trivially learnable environment for smoke tests: reward = share of digits in the answer.

A randomly initialised tiny model emits a few digits by chance, so GRPO gets signal from the first step
and the mean reward climbs within a minute on CPU. It checks the RL plumbing, not the model.
"""

from __future__ import annotations

import random

from .base import Environment

__all__ = ["DigitsEnvironment"]


class DigitsEnvironment(Environment):
    """"Answer with digits only"; reward = digits / visible characters (0 for an empty answer)."""

    name = "digits"

    def sample_task(self, rng: random.Random) -> dict:
        return {"n": rng.randint(0, 99)}

    def prompt(self, task: dict) -> str:
        return f"Count to {task['n']} using digits only."

    def score(self, task: dict, answer: str) -> float:
        visible = [c for c in answer if not c.isspace()]
        if not visible:
            return 0.0
        return sum(c.isdigit() for c in visible) / len(visible)
