"""Instruction-following environment: word limits, JSON with keys, keywords."""

import random

import pytest

from transformers_nemotron3.trainers.environments import InstructionEnvironment
from transformers_nemotron3.trainers.environments.instruction_env import check_constraint

TASK = {"topic": "Paris", "constraints": [
    {"kind": "max_words", "value": 8}, {"kind": "json", "keys": ["city"]}, {"kind": "include", "words": ["sunny"]}]}


def test_right_answer_meets_every_constraint():
    env = InstructionEnvironment()
    assert env.score(TASK, '{"city": "Paris", "sky": "sunny"}') == 1.0
    assert env.score(TASK, '```json\n{"city": "Paris", "sky": "sunny"}\n```') == 1.0


def test_wrong_answers_get_partial_or_no_credit():
    env = InstructionEnvironment()
    assert env.score(TASK, '{"town": "Paris", "sky": "sunny"}') == pytest.approx(2 / 3)  # key missing
    assert env.score(TASK, '{"city": "Paris", "sky": "rainy"}') == pytest.approx(2 / 3)  # keyword missing
    long = '{"city": "Paris", "sky": "sunny", "a": "one two three four five six"}'
    assert env.score(TASK, long) == pytest.approx(2 / 3)  # too many words
    assert env.score(TASK, "It is rainy in Rome and has been for many, many long days.") == 0.0


@pytest.mark.parametrize("answer", ["", "{city: Paris sunny", "[\"city\", \"sunny\"]", "null"])
def test_malformed_json_fails_the_json_constraint(answer):
    assert not check_constraint({"kind": "json", "keys": ["city"]}, answer)


def test_exclude_min_words_and_unknown_kind():
    assert check_constraint({"kind": "exclude", "words": ["dog"]}, "a quick fox")
    assert not check_constraint({"kind": "exclude", "words": ["dog"]}, "a lazy Dog")
    assert check_constraint({"kind": "min_words", "value": 3}, "one two three")
    assert not check_constraint({"kind": "max_words", "value": 3}, "")
    with pytest.raises(ValueError, match="unknown constraint kind"):
        check_constraint({"kind": "rhyme"}, "x")


def test_sampled_tasks_are_satisfiable_and_prompted():
    env, rng = InstructionEnvironment(), random.Random(1)
    for _ in range(30):
        task = env.sample_task(rng)
        kinds = [c["kind"] for c in task["constraints"]]
        assert not ("include" in kinds and "exclude" in kinds)
        assert "Rules:" in env.reset(task)[0]["content"]
