"""Arithmetic with exact answers: integers, fractions and simple expressions, checked with ``Fraction``.

The answer is read from ``\\boxed{...}``, else from an ``Answer:`` line, else from the last line. It may be
any equivalent form: ``3/4``, ``0.75``, ``6/8``, ``(1+2)/4`` all match 3/4. Expressions are evaluated by a
small AST walker (numbers, + - * /, unary minus, parentheses, small integer powers), never by ``eval``.
"""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction

from .base import Environment

__all__ = ["MathEnvironment", "parse_number"]

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER = re.compile(r"answer\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_MAX_TEXT = 64


def _eval(node) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.Div):
            return left / right  # ZeroDivisionError -> not a number
        if isinstance(node.op, ast.Pow) and right.denominator == 1 and abs(right) <= 8:
            return left ** int(right)
    raise ValueError("unsupported expression")


def parse_number(text: str) -> Fraction | None:
    """Exact value of a number, fraction or simple arithmetic expression; None if it is not one."""
    text = text.strip().rstrip(".").replace("^", "**").replace(",", "").replace("$", "").strip()
    if not text or len(text) > _MAX_TEXT:
        return None
    try:
        return _eval(ast.parse(text, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError, OverflowError, RecursionError):
        return None


def extract_answer(text: str) -> str:
    """The answer span of a reply: ``\\boxed{}`` content, else after ``Answer:``, else the last line."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    found = _ANSWER.findall(text)
    if found:
        return found[-1]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class MathEnvironment(Environment):
    """Add, subtract, multiply or divide two small numbers or fractions; reward 1 for the exact value."""

    name = "math"

    def __init__(self, max_operand: int = 9) -> None:
        super().__init__()
        self.max_operand = max_operand

    def sample_task(self, rng: random.Random) -> dict:
        a, b = rng.randint(1, self.max_operand), rng.randint(1, self.max_operand)
        op = rng.choice("+-*/")
        if rng.random() < 0.3:
            question = f"{a}/{b} {op} {b}/{a}"
        else:
            question = f"{a} {op} {b}"
        value = parse_number(question)
        return {"question": question, "answer": f"{value.numerator}/{value.denominator}"}

    def prompt(self, task: dict) -> str:
        return f"What is {task['question']}? Give the exact answer as \\boxed{{...}}."

    def score(self, task: dict, answer: str) -> float:
        expected = parse_number(task["answer"])
        got = parse_number(extract_answer(answer))
        return 1.0 if got is not None and got == expected else 0.0
