"""Generation extras for Nemotron 3: chat format, output parsing, thinking-budget control.

* :func:`released_chat_template` / :func:`training_chat_template` / :func:`render_chat`: the chat
  templates released with the Nano / Super / Ultra checkpoints (read from TRL) and a renderer using them.
* :func:`parse_assistant_output`: split generated text into reasoning, content, tool calls.
* :class:`ThinkingBudgetLogitsProcessor`: end ``<think>`` after a token budget in ``generate``.

See docs/chat_and_thinking.md. (MTP speculative decoding modules will live here as well.)
"""

from .chat_template import (
    CHAT_TEMPLATE_FAMILIES,
    chat_template_family,
    ensure_chat_template,
    released_chat_template,
    render_chat,
    render_tool_call,
    training_chat_template,
)
from .parsing import InvalidToolCall, ParsedOutput, ToolCall, parse_assistant_output
from .thinking_budget import ThinkingBudgetLogitsProcessor

__all__ = [
    "CHAT_TEMPLATE_FAMILIES",
    "InvalidToolCall",
    "ParsedOutput",
    "ThinkingBudgetLogitsProcessor",
    "ToolCall",
    "parse_assistant_output",
    "chat_template_family",
    "ensure_chat_template",
    "released_chat_template",
    "render_chat",
    "render_tool_call",
    "training_chat_template",
]

# MTP self-speculative decoding (issue 3, item 3)
from .mtp_speculative import greedy_generate, mtp_generate  # noqa: E402

__all__ += ["greedy_generate", "mtp_generate"]


def __getattr__(name: str):
    # NEMOTRON3_CHAT_TEMPLATE (the released Nano template) is read lazily: it needs TRL installed.
    if name == "NEMOTRON3_CHAT_TEMPLATE":
        return released_chat_template("nano")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
