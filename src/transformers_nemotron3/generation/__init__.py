"""Generation extras for Nemotron 3: chat format, output parsing, thinking-budget control.

* :data:`NEMOTRON3_CHAT_TEMPLATE` / :func:`render_chat`: the chat template (Jinja, for
  ``tokenizer.chat_template``) and the same format in plain Python.
* :func:`parse_assistant_output`: split generated text into reasoning, content, tool calls.
* :class:`ThinkingBudgetLogitsProcessor`: end ``<think>`` after a token budget in ``generate``.

See docs/chat_and_thinking.md. (MTP speculative decoding modules will live here as well.)
"""

from .chat_template import (
    NEMOTRON3_CHAT_TEMPLATE,
    render_chat,
    render_tool_call,
    render_tool_declarations,
)
from .parsing import InvalidToolCall, ParsedOutput, ToolCall, parse_assistant_output
from .thinking_budget import ThinkingBudgetLogitsProcessor

__all__ = [
    "NEMOTRON3_CHAT_TEMPLATE",
    "InvalidToolCall",
    "ParsedOutput",
    "ThinkingBudgetLogitsProcessor",
    "ToolCall",
    "parse_assistant_output",
    "render_chat",
    "render_tool_call",
    "render_tool_declarations",
]

# MTP self-speculative decoding (issue 3, item 3)
from .mtp_speculative import greedy_generate, mtp_generate  # noqa: E402

__all__ += ["greedy_generate", "mtp_generate"]
