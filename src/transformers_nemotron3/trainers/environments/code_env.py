"""Write a Python function; the reward is the fraction of hidden unit tests it passes in the sandbox.

The code is taken from the last fenced block of the answer (```python ... ```), else the whole answer. Tests
run in :mod:`.sandbox` (separate process, time and memory limits, temporary directory, scrubbed
environment); code that loops, forks, allocates without bound or writes outside its directory scores 0.
"""

from __future__ import annotations

import random
import re

from .base import Environment
from .sandbox import run_tests

__all__ = ["CodeEnvironment", "extract_code", "PROBLEMS"]

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)

#: (function name, description, hidden tests)
PROBLEMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("add", "add(a, b) returns a + b", ("assert add(1, 2) == 3", "assert add(-4, 4) == 0", "assert add(10, 5) == 15")),
    ("square", "square(x) returns x * x", ("assert square(3) == 9", "assert square(-2) == 4", "assert square(0) == 0")),
    ("is_even", "is_even(n) returns True when n is even", ("assert is_even(4) is True", "assert is_even(7) is False",
                                                         "assert is_even(0) is True")),
    ("reverse", "reverse(s) returns the string s reversed", ("assert reverse('abc') == 'cba'",
                                                            "assert reverse('') == ''", "assert reverse('a') == 'a'")),
    ("maximum", "maximum(xs) returns the largest item of a non-empty list",
     ("assert maximum([1, 5, 2]) == 5", "assert maximum([-3]) == -3", "assert maximum([2, 2]) == 2")),
)


def extract_code(answer: str) -> str:
    """The last fenced code block of ``answer``, or the whole answer when there is none."""
    blocks = _FENCE.findall(answer)
    return blocks[-1] if blocks else answer


class CodeEnvironment(Environment):
    """Implement a small function; reward = fraction of hidden tests passed."""

    name = "code"

    def __init__(self, time_limit: float = 3.0, memory_mb: int = 256) -> None:
        super().__init__()
        self.time_limit = time_limit
        self.memory_mb = memory_mb

    def sample_task(self, rng: random.Random) -> dict:
        name, description, tests = rng.choice(PROBLEMS)
        return {"function": name, "description": description, "tests": list(tests)}

    def prompt(self, task: dict) -> str:
        return f"Write a Python function {task['description']}. Reply with one ```python``` block."

    def score(self, task: dict, answer: str) -> float:
        code = extract_code(answer)
        if f"def {task['function']}" not in code:
            return 0.0  # malformed: no function of that name; skip the process
        return run_tests(code, task["tests"], self.time_limit, self.memory_mb).fraction
