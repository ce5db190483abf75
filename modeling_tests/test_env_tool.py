"""Tool-use environment: multi-turn <tool_call> / <tool_response>, reward on the final answer."""

import json

from transformers_nemotron3.generation.chat_template import render_chat, render_tool_call
from transformers_nemotron3.trainers.environments import ToolEnvironment

TASK = {"city": "Oslo", "temperature": 7}
CALL = "<think></think>" + render_tool_call({"name": "get_weather", "arguments": {"city": "Oslo"}}) + "<|im_end|>"


def test_right_answer_after_a_tool_call():
    env = ToolEnvironment()
    env.reset(TASK)
    step = env.step(CALL)
    assert not step.done and step.observations[0]["role"] == "tool"
    assert json.loads(step.observations[0]["content"]) == {"city": "Oslo", "temperature_c": 7}
    assert env.step("<think></think>It is 7 degrees in Oslo.<|im_end|>").done
    assert env.reward() == 1.0 and env.tool_calls == 1 and env.turns == 2


def test_tool_messages_render_as_tool_responses():
    env = ToolEnvironment()
    messages = env.reset(TASK)
    observations = env.step(CALL).observations
    text = render_chat(messages + [{"role": "assistant", "content": "", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}]}] + observations, tools=env.tools())
    assert "<tool_response>\n{\"city\": \"Oslo\", \"temperature_c\": 7}\n</tool_response>" in text
    assert "<function=get_weather>" in text


def test_wrong_answers():
    env = ToolEnvironment()
    assert env.score(TASK, "It is 8 degrees.") == 0.0
    assert env.score(TASK, "It is cold.") == 0.0
    env.reset(TASK)
    env.step(CALL.replace("Oslo", "Lima"))  # wrong city: the tool reports an error
    env.step("<think></think>17<|im_end|>")
    assert env.reward() == 0.0


def test_malformed_tool_calls_get_an_error_and_no_reward():
    env = ToolEnvironment(max_turns=2)
    env.reset(TASK)
    step = env.step("<think></think><tool_call>\n<function=get_weather>\nOslo\n</tool_call><|im_end|>")
    assert not step.done and "error" in step.observations[0]["content"]
    step = env.step(CALL)  # turn limit reached while still calling tools: no final answer
    assert step.done and env.reward() == 0.0


def test_answer_without_tool_can_still_be_scored_but_only_if_right():
    env = ToolEnvironment()
    env.reset(TASK)
    env.step("<think></think>Probably 20 degrees.<|im_end|>")
    assert env.reward() == 0.0
