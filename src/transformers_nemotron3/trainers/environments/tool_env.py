"""Multi-turn tool use in the Nemotron 3 format: call ``get_weather`` and report the temperature.

The temperature is drawn per task and only the tool knows it, so the model must call the tool:

    assistant: <tool_call>\\n<function=get_weather>\\n<parameter=city>\\nParis\\n</parameter>\\n</function>\\n</tool_call>
    user:      <tool_response>\\n{"city": "Paris", "temperature_c": 17}\\n</tool_response>
    assistant: It is 17 degrees in Paris.

A turn with tool calls (well-formed or not) gets tool responses and the episode goes on; a turn without
is the final answer. Reward 1 when the final answer states the right temperature, else 0 (also when the
turn limit is hit first).
"""

from __future__ import annotations

import json
import random
import re

from ...generation.parsing import parse_assistant_output
from .base import Environment, StepResult

__all__ = ["ToolEnvironment", "WEATHER_TOOL"]

CITIES = ("Paris", "Berlin", "Rome", "Oslo", "Lima", "Tokyo")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current temperature of a city in degrees Celsius.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}


class ToolEnvironment(Environment):
    """Ask for a city's temperature; the ``get_weather`` tool holds the answer."""

    name = "tool"

    def __init__(self, max_turns: int = 3) -> None:
        super().__init__()
        self.max_turns = max_turns
        self.tool_calls = 0

    def tools(self) -> list[dict]:
        return [WEATHER_TOOL]

    def sample_task(self, rng: random.Random) -> dict:
        return {"city": rng.choice(CITIES), "temperature": rng.randint(-5, 35)}

    def prompt(self, task: dict) -> str:
        return f"What is the temperature in {task['city']} right now? Use the tool, then answer."

    def reset(self, task: dict) -> list[dict]:
        self.tool_calls = 0
        return super().reset(task)

    # --- the tool
    def get_weather(self, city: str) -> str:
        if str(city).strip().lower() == self.task["city"].lower():
            return json.dumps({"city": self.task["city"], "temperature_c": self.task["temperature"]})
        return json.dumps({"error": f"unknown city {city!r}"})

    def step(self, assistant_text: str) -> StepResult:
        if self.task is None:
            raise ValueError("call reset(task) before step()")
        self.turns += 1
        parsed = parse_assistant_output(assistant_text, enable_thinking=assistant_text.lstrip().startswith("<think>"),
                                        tools=self.tools())
        if not parsed.tool_calls and not parsed.invalid_tool_calls:
            self.answer = parsed.content
            return StepResult(done=True)
        responses = []
        for call in parsed.tool_calls:
            self.tool_calls += 1
            if call.name == "get_weather" and set(call.arguments) == {"city"}:
                responses.append(self.get_weather(call.arguments["city"]))
            else:
                responses.append(json.dumps({"error": f"unknown tool or arguments: {call.name}"}))
        for bad in parsed.invalid_tool_calls:
            responses.append(json.dumps({"error": f"malformed tool call: {bad.error}"}))
        done = self.turns >= self.max_turns
        return StepResult(done=done, observations=[] if done else [{"role": "tool", "content": r} for r in responses])

    def score(self, task: dict, answer: str) -> float:
        if "<tool_call>" in answer:
            return 0.0
        numbers = [int(n) for n in re.findall(r"(?<![\d.])-?\d+(?![\d.])", answer)]
        return 1.0 if numbers and numbers[-1] == task["temperature"] else 0.0
