"""Instruction following with verifiable format constraints: word count, JSON with keys, keywords.

A task is a topic plus a list of constraints; the reward is the fraction of constraints the answer meets
(1.0 only when all hold). Constraint kinds:

* ``{"kind": "max_words", "value": n}`` / ``{"kind": "min_words", "value": n}``
* ``{"kind": "json", "keys": [...]}``: the whole answer is a JSON object holding these keys
* ``{"kind": "include", "words": [...]}`` / ``{"kind": "exclude", "words": [...]}`` (case-insensitive words)
"""

from __future__ import annotations

import json
import random
import re

from .base import Environment

__all__ = ["InstructionEnvironment", "check_constraint"]

_TOPICS = ("the weather", "a small model", "the city of Paris", "a lazy dog", "breakfast")
_KEYWORDS = ("model", "small", "quick", "answer", "paris", "sunny")


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _strip_fence(text: str) -> str:
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    return (fenced.group(1) if fenced else text).strip()


def check_constraint(constraint: dict, answer: str) -> bool:
    """Whether ``answer`` meets one constraint (unknown kinds raise ValueError)."""
    kind = constraint.get("kind")
    words = [w.lower() for w in _words(answer)]
    if kind == "max_words":
        return 0 < len(words) <= int(constraint["value"])
    if kind == "min_words":
        return len(words) >= int(constraint["value"])
    if kind == "json":
        try:
            value = json.loads(_strip_fence(answer))
        except (json.JSONDecodeError, ValueError):
            return False
        return isinstance(value, dict) and all(key in value for key in constraint.get("keys", []))
    if kind == "include":
        return all(w.lower() in words for w in constraint["words"])
    if kind == "exclude":
        return not any(w.lower() in words for w in constraint["words"])
    raise ValueError(f"unknown constraint kind {kind!r}; use max_words, min_words, json, include or exclude")


def describe(constraint: dict) -> str:
    kind = constraint["kind"]
    if kind == "max_words":
        return f"use at most {constraint['value']} words"
    if kind == "min_words":
        return f"use at least {constraint['value']} words"
    if kind == "json":
        return "answer with a JSON object with the keys " + ", ".join(constraint["keys"])
    if kind == "include":
        return "include the words " + ", ".join(constraint["words"])
    return "do not use the words " + ", ".join(constraint["words"])


class InstructionEnvironment(Environment):
    """Write about a topic under 1-3 verifiable format constraints; reward = fraction met."""

    name = "instruction"

    def sample_task(self, rng: random.Random) -> dict:
        pool = [
            {"kind": "max_words", "value": rng.choice([5, 10, 20])},
            {"kind": "min_words", "value": rng.choice([3, 6])},
            {"kind": "json", "keys": rng.sample(["name", "city", "ok"], k=rng.randint(1, 2))},
            {"kind": "include", "words": rng.sample(_KEYWORDS, k=1)},
            {"kind": "exclude", "words": rng.sample(_KEYWORDS, k=1)},
        ]
        constraints = rng.sample(pool, k=rng.randint(1, 3))
        kinds = {c["kind"] for c in constraints}
        if "include" in kinds and "exclude" in kinds:  # keep the task satisfiable
            constraints = [c for c in constraints if c["kind"] != "exclude"]
        if "max_words" in kinds and "min_words" in kinds:
            constraints = [c for c in constraints if c["kind"] != "min_words"]
        return {"topic": rng.choice(_TOPICS), "constraints": constraints}

    def prompt(self, task: dict) -> str:
        rules = "; ".join(describe(c) for c in task["constraints"])
        return f"Write about {task['topic']}. Rules: {rules}."

    def score(self, task: dict, answer: str) -> float:
        constraints = task["constraints"]
        if not constraints:
            return 1.0
        return sum(check_constraint(c, answer) for c in constraints) / len(constraints)
