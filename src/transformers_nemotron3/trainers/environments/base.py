"""The environment interface shared by every RL environment.

An environment turns a *task* (a JSON-serialisable dict) into a conversation and scores the model's final
answer. One instance serves one episode:

    env = MathEnvironment()
    task = env.sample_task(random.Random(0))     # or a task from a dataset
    messages = env.reset(task)                    # the opening chat messages
    step = env.step(assistant_text)               # one assistant turn in; tool results (if any) out
    while not step.done:                          # multi-turn environments answer tool calls
        ... generate the next assistant turn after step.observations ...
        step = env.step(next_text)
    reward = env.reward()                         # verifiable, in [0, 1]

``score(task, answer)`` is the pure reward function (what the tests exercise on right, wrong and malformed
answers); ``reward()`` applies it to the final answer of the episode.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ...generation.parsing import parse_assistant_output

__all__ = ["Environment", "StepResult", "final_answer"]


def final_answer(text: str) -> str:
    """The visible answer of one assistant turn: reasoning, tool calls and end markers removed.

    ``text`` is the whole turn including the ``<think>`` opening of the generation prompt (the rollout
    prepends it), so a turn whose reasoning never closed has no answer.
    """
    return parse_assistant_output(text, enable_thinking=text.lstrip().startswith("<think>")).content


@dataclass
class StepResult:
    """What the environment says after one assistant turn.

    Attributes:
        done: the episode is over (a final answer was given or the turn limit was hit).
        observations: tool messages (``{"role": "tool", "content": ...}``) to show the model next.
    """

    done: bool
    observations: list[dict[str, Any]] = field(default_factory=list)


class Environment(ABC):
    """Base class: single-turn by default; override ``step`` for tools (see ``tool_env.py``)."""

    #: name used in datasets, logs and sampling weights
    name: str = "base"
    #: most assistant turns in one episode
    max_turns: int = 1

    def __init__(self) -> None:
        self.task: dict[str, Any] | None = None
        self.turns = 0
        self.answer: str | None = None

    # --- what subclasses provide
    @abstractmethod
    def sample_task(self, rng: random.Random) -> dict[str, Any]:
        """A fresh task (JSON-serialisable; hidden fields such as answers or tests stay out of the prompt)."""

    @abstractmethod
    def prompt(self, task: dict[str, Any]) -> str:
        """The user message that poses the task."""

    @abstractmethod
    def score(self, task: dict[str, Any], answer: str) -> float:
        """Verifiable reward in [0, 1] of a final answer (visible text of the last assistant turn)."""

    def tools(self) -> list[dict[str, Any]] | None:
        """JSON-schema tool declarations for the chat template (None: no tools)."""
        return None

    # --- the episode
    def reset(self, task: dict[str, Any]) -> list[dict[str, Any]]:
        """Start an episode on ``task``; returns the opening messages."""
        self.task, self.turns, self.answer = task, 0, None
        return [{"role": "user", "content": self.prompt(task)}]

    def step(self, assistant_text: str) -> StepResult:
        """Take one assistant turn (decoded with special tokens). Single-turn: it is the final answer."""
        if self.task is None:
            raise ValueError("call reset(task) before step()")
        self.turns += 1
        self.answer = final_answer(assistant_text)
        return StepResult(done=True)

    def reward(self) -> float:
        """Score of the episode's final answer (0 when the episode ended without one)."""
        if self.task is None:
            raise ValueError("call reset(task) before reward()")
        if self.answer is None:
            return 0.0
        return float(self.score(self.task, self.answer))
