"""The released Nemotron 3 chat templates, read from TRL, and a renderer that uses them.

We do not keep a copy of the chat format. A real checkpoint's tokenizer carries its own
``chat_template``: use ``tokenizer.apply_chat_template``. Where a template is needed and none is at
hand (the tiny offline tokenizer, SFT of a tokenizer without one, data code without a tokenizer),
the templates NVIDIA released with the checkpoints are used, as TRL ships them
(``trl/chat_templates/nemotron_3_{nano,super,ultra}.jinja``), together with TRL's training
variants (``*_training.jinja``: the same text plus ``{% generation %}`` markers, which TRL's
``get_training_chat_template`` swaps in for ``assistant_only_loss``).

The template files are read from the installed TRL package without importing it (importing
``trl`` costs seconds). TRL stays an optional dependency of the core package (model, generation,
parser, thinking budget); the functions here that need a template raise ``ImportError`` naming the
``[trl]`` extra when TRL is not installed.

The families differ only in small ways (see docs/chat_and_thinking.md):

* ``nano``: ``<think>\\n{reasoning}\\n</think>\\n{content}``; an earlier turn whose reasoning is
  dropped (``truncate_history_thinking``, on by default) keeps the newline: ``<think></think>\\n{content}``.
* ``super``: as nano, plus ``low_effort=True`` appends ``\\n\\n{reasoning effort: low}`` to the last
  user message.
* ``ultra``: ``<think>\\n{reasoning}</think>{content}`` (no newlines around ``</think>``), plus
  ``medium_effort=True`` appends ``\\n\\n{reasoning effort: efficient}``.

All three always write a system turn (empty without a system message), declare tools in it,
render tool calls as ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n
</function>\\n</tool_call>\\n`` and end the generation prompt with ``<think>\\n`` (thinking on) or
``<think></think>`` (thinking off).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE_FAMILIES",
    "chat_template_family",
    "ensure_chat_template",
    "released_chat_template",
    "render_chat",
    "render_tool_call",
    "training_chat_template",
]

CHAT_TEMPLATE_FAMILIES: tuple[str, ...] = ("nano", "super", "ultra")
"""Model families whose released chat template this package uses (TRL file ``nemotron_3_{family}.jinja``)."""

_EFFORT_FLAGS = {"low_effort": "super", "medium_effort": "ultra"}  # flag -> the one family whose template reads it
_TRL_EXTRA = "pip install 'transformers-nemotron3[trl]' (or pip install 'trl>=1.16')"


# --------------------------------------------------------------------------- the templates


def _trl_chat_templates_dir() -> Path:
    """TRL's ``chat_templates`` folder, found without importing ``trl``."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the released Nemotron 3 chat templates are read from TRL, which is not installed; {_TRL_EXTRA}")
    return Path(next(iter(spec.submodule_search_locations))) / "chat_templates"


def _check_family(family: str) -> str:
    if family not in CHAT_TEMPLATE_FAMILIES:
        raise ValueError(f"chat template family {family!r} is unknown; use one of {CHAT_TEMPLATE_FAMILIES}")
    return family


@functools.cache
def _read_template(stem: str) -> str:
    path = _trl_chat_templates_dir() / f"{stem}.jinja"
    if not path.is_file():
        version = importlib.metadata.version("trl")
        raise ImportError(f"TRL {version} has no chat_templates/{stem}.jinja; upgrade it: pip install 'trl>=1.16'")
    return path.read_text(encoding="utf-8")


def released_chat_template(family: str = "nano") -> str:
    """The chat template released with the ``family`` checkpoints (TRL's ``nemotron_3_{family}.jinja``).

    Raises:
        ValueError: ``family`` is not one of :data:`CHAT_TEMPLATE_FAMILIES`.
        ImportError: TRL is not installed (or too old to ship the file).
    """
    return _read_template(f"nemotron_3_{_check_family(family)}")


def training_chat_template(family: str = "nano") -> str:
    """TRL's training variant of :func:`released_chat_template`: same text, plus ``{% generation %}`` markers.

    It renders the same string; with ``return_assistant_tokens_mask=True`` it also marks each assistant
    turn's body and its ``<|im_end|>\\n``, which is what ``assistant_only_loss`` trains on. TRL's
    ``get_training_chat_template`` returns this text for a tokenizer carrying the released template.
    """
    return _read_template(f"nemotron_3_{_check_family(family)}_training")


def chat_template_family(chat_template: str | Mapping[str, str] | None) -> str | None:
    """The family whose released (or TRL training) template ``chat_template`` is, else None.

    Accepts a tokenizer's ``chat_template`` as is (a dict of named templates is read at ``"default"``).
    Only exact text matches count, as in TRL's ``get_training_chat_template``.
    """
    if isinstance(chat_template, Mapping):
        chat_template = chat_template.get("default")
    if not isinstance(chat_template, str):
        return None
    for family in CHAT_TEMPLATE_FAMILIES:
        if chat_template in (released_chat_template(family), training_chat_template(family)):
            return family
    return None


def ensure_chat_template(tokenizer: Any, family: str = "nano") -> Any:
    """Give ``tokenizer`` the released ``family`` template if it carries none; returns the tokenizer.

    A tokenizer that already has a ``chat_template`` (every released checkpoint's does) is left as
    it is. Call this before ``tokenizer.save_pretrained`` so that a saved checkpoint carries its
    chat format (written as ``chat_template.jinja``).
    """
    _check_family(family)
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = released_chat_template(family)
    return tokenizer


def __getattr__(name: str) -> str:
    # NEMOTRON3_CHAT_TEMPLATE is kept for callers of the old name; read lazily so that importing this
    # module works without TRL.
    if name == "NEMOTRON3_CHAT_TEMPLATE":
        return released_chat_template("nano")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- rendering


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Reject input that the released templates would render into something other than what was meant."""
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} is {message!r}; pass dicts with a 'role' string and 'content'")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(
                f"message {i} has content of type {type(content).__name__}; Nemotron 3 chat is text-only, pass a string"
            )
        for call in message.get("tool_calls") or []:
            _check_tool_call(call)


def _unwrap_function(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept both OpenAI style ``{"type": "function", "function": {...}}`` and bare specs."""
    inner = item.get("function")
    return inner if isinstance(inner, Mapping) else item


def _check_tool_call(tool_call: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    fn = _unwrap_function(tool_call)
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call {dict(tool_call)!r} has no function name; set function.name")
    args = fn.get("arguments")
    args = {} if args is None else args
    if not isinstance(args, Mapping):
        raise ValueError(
            f"tool call {name!r} has arguments of type {type(args).__name__}; pass a dict "
            "(json.loads a JSON string first)"
        )
    return name, args


def render_tool_call(tool_call: Mapping[str, Any]) -> str:
    """One tool call as the released templates write it; ends with ``</tool_call>\\n``.

    ``tool_call`` is ``{"function": {"name", "arguments"}}`` or bare ``{"name", "arguments"}``, with
    ``arguments`` a dict. Dicts and lists are written as JSON, everything else as Jinja's ``string``
    filter writes it (Python's ``str``: ``"Paris"``, ``2``, ``True``). Handy for scripting model
    output in tests; the test suite checks it against the templates.
    """
    name, args = _check_tool_call(tool_call)
    out = f"<tool_call>\n<function={name}>\n"
    for key, value in args.items():
        is_json = isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, str))
        text = json.dumps(value, ensure_ascii=False) if is_json else str(value)
        out += f"<parameter={key}>\n{text}\n</parameter>\n"
    return out + "</function>\n</tool_call>\n"


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    family: str = "nano",
    enable_thinking: bool = True,
    add_generation_prompt: bool = False,
    truncate_history_thinking: bool = True,
    low_effort: bool = False,
    medium_effort: bool = False,
) -> str:
    """Render a conversation with the released ``family`` template, without a tokenizer.

    The same string as ``tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, ...)``
    on a tokenizer carrying that template: rendering goes through transformers' own Jinja
    environment (``render_jinja_template``).

    Args:
        messages: dicts with ``role`` and string ``content``; assistant messages may carry
            ``reasoning_content`` (or inline ``<think>...</think>``) and ``tool_calls`` (arguments as dicts).
        tools: JSON-schema tool specs, declared in the system turn.
        family: ``"nano"``, ``"super"`` or ``"ultra"`` (:data:`CHAT_TEMPLATE_FAMILIES`).
        enable_thinking: the generation prompt ends with ``<think>\\n`` (on) or ``<think></think>`` (off).
        add_generation_prompt: append the opening of an assistant turn.
        truncate_history_thinking: drop the reasoning of assistant turns before the last user message.
        low_effort: Super only: append ``{reasoning effort: low}`` to the last user message.
        medium_effort: Ultra only: append ``{reasoning effort: efficient}`` to the last user message.

    Raises:
        ValueError: unknown family, an effort flag the family's template does not read, non-string
            content, a tool call without a name or with non-dict arguments.
        ImportError: TRL (where the templates come from) is not installed.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    _check_family(family)
    flags = {"low_effort": low_effort, "medium_effort": medium_effort}
    for flag, owner in _EFFORT_FLAGS.items():
        if flags[flag] and family != owner:
            raise ValueError(f"{flag}=True is read only by the {owner!r} template; pass family={owner!r} or drop it")
    _check_messages(messages)
    # Like apply_chat_template: keys set to None count as missing (content=None, tool_calls=None).
    messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
    kwargs = {flag: True for flag, on in flags.items() if on}
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=list(tools) if tools else None,
        chat_template=released_chat_template(family),
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        truncate_history_thinking=truncate_history_thinking,
        **kwargs,
    )
    return rendered[0]
