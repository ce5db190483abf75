"""Split generated Nemotron 3 assistant text into reasoning, content and tool calls.

Input is the text of one assistant turn, as decoded with ``skip_special_tokens=False``: either
what the model generated after the generation prompt (with thinking on the prompt already
ends with ``<think>\\n``, so the text starts inside the reasoning) or a whole rendered turn.
It reads every released Nemotron 3 template's output (see ``chat_template.py``): Nano / Super
write ``<think>\\n...\\n</think>\\n...``, Ultra ``<think>\\n...</think>...``; the tests parse
what those templates render and compare with TRL's response parser. Nothing here raises on model output: a missing
``</think>`` sets ``reasoning_truncated``, a broken tool call lands in ``invalid_tool_calls``
with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["InvalidToolCall", "ParsedOutput", "ToolCall", "parse_assistant_output"]

_END_MARKERS = ("<|im_end|>", "</s>")
_TOOL_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|(?=<tool_call>)|\Z)", re.DOTALL)
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*$", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


@dataclass
class ToolCall:
    """One well-formed tool call: the function name and its decoded arguments."""

    name: str
    arguments: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """OpenAI-style ``{"type": "function", "function": {...}}`` (what the template reads)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class InvalidToolCall:
    """A ``<tool_call>`` block that could not be parsed: its raw text and why."""

    text: str
    error: str


@dataclass
class ParsedOutput:
    """The parts of one assistant turn.

    Attributes:
        reasoning: the text inside ``<think>...</think>`` ("" when there was none).
        content: the visible answer, outside reasoning and tool-call blocks, stripped.
        tool_calls: well-formed tool calls, in order.
        invalid_tool_calls: malformed tool-call blocks with the reason each was rejected.
        reasoning_truncated: thinking was on but ``</think>`` never came (e.g. max tokens hit).
    """

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    reasoning_truncated: bool = False

    def to_message(self) -> dict[str, Any]:
        """An assistant message dict that ``render_chat`` / the chat template accept."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        return message


def _parameter_types(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """{function name: {parameter name: JSON-schema type}} from tool declarations."""
    types: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        spec = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
        props = (spec.get("parameters") or {}).get("properties") or {}
        types[spec.get("name", "")] = {k: v.get("type") for k, v in props.items()}
    return types


def _decode_value(raw: str, declared_type: Any) -> Any:
    """A parameter value: kept as text for declared strings, else JSON when it parses as JSON.

    The templates write non-JSON scalars with Jinja's ``string`` filter, so a boolean arrives as
    ``True`` / ``False``; a parameter declared ``"boolean"`` reads those (and ``true`` / ``false``).
    """
    if declared_type == "string":
        return raw
    if declared_type == "boolean" and raw.strip() in ("True", "False", "true", "false"):
        return raw.strip() in ("True", "true")
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _parse_tool_block(body: str, closed: bool, types: Mapping[str, Mapping[str, Any]]) -> ToolCall | str:
    """Parse the inside of one ``<tool_call>`` block; returns the call or an error message."""
    if not closed:
        return "missing </tool_call> (output truncated?)"
    match = _FUNCTION.match(body)
    if match is None:
        return "expected <function=NAME>...</function> inside <tool_call>"
    name, inner = match.group(1).strip(), match.group(2)
    if not name:
        return "empty function name"
    params = _PARAMETER.findall(inner)
    leftover = _PARAMETER.sub("", inner).strip()
    if leftover:
        return f"unexpected text inside <function={name}>: {leftover[:60]!r}"
    declared = types.get(name, {})
    arguments = {key.strip(): _decode_value(value, declared.get(key.strip())) for key, value in params}
    return ToolCall(name=name, arguments=arguments)


def parse_assistant_output(
    text: str,
    enable_thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> ParsedOutput:
    """Split one assistant turn into reasoning, content and tool calls.

    Args:
        text: decoded assistant text (special tokens kept); a trailing ``<|im_end|>`` or
            ``</s>`` is ignored.
        enable_thinking: how the turn was prompted. With thinking on, text without
            ``</think>`` is unfinished reasoning (``reasoning_truncated=True``); with thinking
            off it is all content.
        tools: the declared tools; parameters declared ``"type": "string"`` stay strings,
            ``"boolean"`` ones read ``True`` / ``False``, all other values are JSON-decoded when they
            parse as JSON (so ``3`` becomes ``3``).

    Returns:
        A :class:`ParsedOutput`; malformed tool calls are reported in ``invalid_tool_calls``.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}; decode the token ids first")
    for marker in _END_MARKERS:
        text = text.split(marker)[0]
    result = ParsedOutput()
    if "</think>" in text:
        reasoning, _, text = text.partition("</think>")
        result.reasoning = reasoning.split("<think>")[-1].strip("\n")
    elif "<think>" in text or enable_thinking:
        result.reasoning = text.split("<think>")[-1].strip("\n")
        result.reasoning_truncated = True
        return result

    types = _parameter_types(tools)
    pieces: list[str] = []
    position = 0
    for block in _TOOL_BLOCK.finditer(text):
        pieces.append(text[position : block.start()])
        position = block.end()
        parsed = _parse_tool_block(block.group(1), bool(block.group(2)), types)
        if isinstance(parsed, ToolCall):
            result.tool_calls.append(parsed)
        else:
            result.invalid_tool_calls.append(InvalidToolCall(text=block.group(0), error=parsed))
    pieces.append(text[position:])
    result.content = "".join(pieces).strip()
    return result
