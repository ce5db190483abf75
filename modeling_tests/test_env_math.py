"""Math environment: exact checking of numbers, fractions and simple expressions."""

import random

import pytest

from transformers_nemotron3.trainers.environments import MathEnvironment
from transformers_nemotron3.trainers.environments.math_env import parse_number

TASK = {"question": "1/2 + 1/4", "answer": "3/4"}


@pytest.mark.parametrize("answer", ["\\boxed{3/4}", "The answer is 0.75", "Answer: 6/8", "\\boxed{(1+2)/4}", "3/4",
                                    "<think>\nadd them\n</think>\nSo \\boxed{0.75}."])
def test_right_answers(answer):
    env = MathEnvironment()
    if answer.startswith("<think>"):
        env.reset(TASK)
        env.step(answer)
        assert env.reward() == 1.0
    else:
        assert env.score(TASK, answer) == 1.0


@pytest.mark.parametrize("answer", ["\\boxed{1/2}", "Answer: 0.7", "3/5", "\\boxed{-3/4}"])
def test_wrong_answers(answer):
    assert MathEnvironment().score(TASK, answer) == 0.0


@pytest.mark.parametrize("answer", ["", "three quarters", "\\boxed{}", "\\boxed{3/0}", "__import__('os')",
                                    "\\boxed{9**9**9}", "1" * 200, "<think>\nunfinished reasoning 3/4"])
def test_malformed_answers_score_zero(answer):
    env = MathEnvironment()
    env.reset(TASK)
    env.step(answer if answer.startswith("<think>") else "<think></think>" + answer)
    assert env.reward() == 0.0


def test_parse_number_is_exact():
    assert parse_number("0.1 + 0.2") == parse_number("3/10")
    assert parse_number("2^3") == 8
    assert parse_number("abs(1)") is None


def test_sampled_tasks_have_consistent_answers():
    env, rng = MathEnvironment(), random.Random(0)
    for _ in range(50):
        task = env.sample_task(rng)
        assert env.score(task, f"\\boxed{{{task['question']}}}") == 1.0
        assert task["question"] in env.reset(task)[0]["content"]
