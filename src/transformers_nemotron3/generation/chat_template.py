"""The Nemotron 3 chat format, twice: a Jinja template and a plain-Python renderer.

``NEMOTRON3_CHAT_TEMPLATE`` is meant for ``tokenizer.chat_template`` (so that
``tokenizer.apply_chat_template`` works), ``render_chat`` is the same format written as
ordinary Python, handy for data pipelines and for tests. The two must produce the identical
string for every input; the test suite checks them against each other and against
hand-written strings.

The format (Nano / Super flavour, see docs/chat_and_thinking.md):

* Every turn is ``<|im_start|>{role}\\n{body}<|im_end|>\\n``. A system turn is always emitted,
  empty if the conversation has none; declared tools are appended to it.
* Assistant bodies start with their reasoning: ``<think>\\n{reasoning}\\n</think>\\n{content}``,
  or ``<think></think>{content}`` when there is no reasoning. With
  ``truncate_history_thinking`` (default on) the reasoning of assistant turns that come before
  the last user message is dropped.
* Tool calls follow the content as
  ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>\\n``.
* Consecutive ``tool`` messages share one ``user`` turn, each wrapped in
  ``<tool_response>\\n...\\n</tool_response>\\n``.
* The generation prompt is ``<|im_start|>assistant\\n<think>\\n`` with thinking on and
  ``<|im_start|>assistant\\n<think></think>`` with it off.
* ``low_effort`` / ``medium_effort`` append ``{reasoning effort: low}`` /
  ``{reasoning effort: efficient}`` to the last user message.

The Jinja version also wraps assistant bodies in ``{% generation %}`` markers (no effect on the
text) so that ``return_assistant_tokens_mask=True`` works for assistant-only training loss.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

__all__ = [
    "NEMOTRON3_CHAT_TEMPLATE",
    "LOW_EFFORT_SUFFIX",
    "MEDIUM_EFFORT_SUFFIX",
    "TOOLS_PREAMBLE",
    "TOOLS_INSTRUCTIONS",
    "render_chat",
    "render_tool_call",
    "render_tool_declarations",
]

LOW_EFFORT_SUFFIX = "\n\n{reasoning effort: low}"
MEDIUM_EFFORT_SUFFIX = "\n\n{reasoning effort: efficient}"
TOOLS_PREAMBLE = "# Tools\n\nYou have access to the following functions:\n\n"
TOOLS_INSTRUCTIONS = (
    "\n\nTo call a function, reply with exactly this format and nothing after it:\n\n"
    "<tool_call>\n<function=function_name>\n<parameter=parameter_name>\nvalue\n</parameter>\n"
    "</function>\n</tool_call>"
)
_ROLES = ("system", "user", "assistant", "tool")


# --------------------------------------------------------------------------- plain Python


def _json(value: Any) -> str:
    """JSON the way transformers' ``tojson`` Jinja filter writes it (no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False)


def _unwrap_function(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept both OpenAI style ``{"type": "function", "function": {...}}`` and bare specs."""
    inner = item.get("function")
    return inner if isinstance(inner, Mapping) else item


def render_tool_declarations(tools: Sequence[Mapping[str, Any]]) -> str:
    """Render tool JSON schemas as the ``<tools>...</tools>`` block of the system turn."""
    lines = ["<tools>"]
    for tool in tools:
        spec = _unwrap_function(tool)
        if not spec.get("name"):
            raise ValueError(f"tool declaration {dict(tool)!r} has no name; give each tool a 'name'")
        lines += ["<function>", f"<name>{spec['name']}</name>"]
        if spec.get("description"):
            lines.append(f"<description>{spec['description'].strip()}</description>")
        lines.append("<parameters>")
        params = spec.get("parameters") or {}
        for pname, pspec in (params.get("properties") or {}).items():
            lines += ["<parameter>", f"<name>{pname}</name>"]
            if "type" in pspec:
                lines.append(f"<type>{pspec['type']}</type>")
            if pspec.get("description"):
                lines.append(f"<description>{pspec['description'].strip()}</description>")
            if "enum" in pspec:
                lines.append(f"<enum>{_json(pspec['enum'])}</enum>")
            lines.append("</parameter>")
        if "required" in params:
            lines.append(f"<required>{_json(params['required'])}</required>")
        lines += ["</parameters>", "</function>"]
    lines.append("</tools>")
    return "\n".join(lines)


def render_tool_call(tool_call: Mapping[str, Any]) -> str:
    """Render one tool call (``{"function": {"name", "arguments"}}`` or bare) as XML.

    ``arguments`` must be a mapping; string values are written verbatim, other values as JSON.
    The result ends with ``</tool_call>\\n``.
    """
    fn = _unwrap_function(tool_call)
    name = fn.get("name")
    if not name:
        raise ValueError(f"tool call {dict(tool_call)!r} has no function name; set function.name")
    args = fn.get("arguments")
    args = {} if args is None else args
    if not isinstance(args, Mapping):
        raise ValueError(
            f"tool call {name!r} has arguments of type {type(args).__name__}; pass a dict "
            "(json.loads a JSON string first)"
        )
    out = f"<tool_call>\n<function={name}>\n"
    for key, value in args.items():
        text = value if isinstance(value, str) else _json(value)
        out += f"<parameter={key}>\n{text}\n</parameter>\n"
    return out + "</function>\n</tool_call>\n"


def _split_reasoning(message: Mapping[str, Any], content: str) -> tuple[str, str]:
    """Return (reasoning, content) of an assistant message, with the edge newlines trimmed."""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        pass
    elif "</think>" in content:
        reasoning = content.split("</think>")[0].split("<think>")[-1]
        content = content.split("</think>")[-1]
    else:
        reasoning = ""
    return reasoning.strip("\n"), content.lstrip("\n")


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(
            f"message {index} has content of type {type(content).__name__}; "
            "Nemotron 3 chat is text-only, pass a string"
        )
    return content


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool = True,
    add_generation_prompt: bool = False,
    truncate_history_thinking: bool = True,
    low_effort: bool = False,
    medium_effort: bool = False,
) -> str:
    """Render a conversation in the Nemotron 3 chat format (same string as the Jinja template).

    Args:
        messages: dicts with ``role`` (system / user / assistant / tool) and ``content``;
            assistant messages may carry ``reasoning_content`` (or inline ``<think>...</think>``)
            and ``tool_calls``.
        tools: JSON-schema tool specs, declared in the system turn.
        enable_thinking: ends the generation prompt with ``<think>\\n`` (on) or
            ``<think></think>`` (off).
        add_generation_prompt: append the opening of an assistant turn.
        truncate_history_thinking: drop reasoning of assistant turns before the last user turn.
        low_effort: append ``{reasoning effort: low}`` to the last user message (Super).
        medium_effort: append ``{reasoning effort: efficient}`` to the last user message (Ultra).

    Raises:
        ValueError: unknown role, system message not first, non-string content, tool call
            without a name or with non-dict arguments.
    """
    if low_effort and medium_effort:
        raise ValueError("low_effort and medium_effort are both set; choose at most one")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; use one of {_ROLES}")
        if role == "system" and i != 0:
            raise ValueError(f"system message at position {i}; a system message must come first")

    system = ""
    if messages and messages[0]["role"] == "system":
        system = _content(messages[0], 0)
        messages = messages[1:]
        offset = 1
    else:
        offset = 0
    if tools:
        declared = TOOLS_PREAMBLE + render_tool_declarations(tools) + TOOLS_INSTRUCTIONS
        system = system + "\n\n" + declared if system else declared
    out = f"<|im_start|>system\n{system}<|im_end|>\n"

    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, message in enumerate(messages):
        role, content = message["role"], _content(message, i + offset)
        if role == "user":
            if i == last_user and low_effort:
                content += LOW_EFFORT_SUFFIX
            if i == last_user and medium_effort:
                content += MEDIUM_EFFORT_SUFFIX
            out += f"<|im_start|>user\n{content}<|im_end|>\n"
        elif role == "assistant":
            reasoning, content = _split_reasoning(message, content)
            if reasoning and not (truncate_history_thinking and i < last_user):
                body = f"<think>\n{reasoning}\n</think>\n{content}"
            else:
                body = f"<think></think>{content}"
            calls = message.get("tool_calls") or []
            if calls and not body.endswith("\n"):
                body += "\n"
            body += "".join(render_tool_call(call) for call in calls)
            out += f"<|im_start|>assistant\n{body}<|im_end|>\n"
        else:  # tool
            if i == 0 or messages[i - 1]["role"] != "tool":
                out += "<|im_start|>user\n"
            out += f"<tool_response>\n{content}\n</tool_response>\n"
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                out += "<|im_end|>\n"
    if add_generation_prompt:
        out += "<|im_start|>assistant\n" + ("<think>\n" if enable_thinking else "<think></think>")
    return out


# --------------------------------------------------------------------------- Jinja
# Written with ``{%- -%}`` everywhere and all text in ``{{ }}`` so that whitespace in the
# template source never reaches the output. Keep it in step with ``render_chat`` above.

NEMOTRON3_CHAT_TEMPLATE = (
    r"""
{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}
{%- set truncate_history_thinking = truncate_history_thinking if truncate_history_thinking is defined else true -%}
{%- set low_effort = low_effort if low_effort is defined else false -%}
{%- set medium_effort = medium_effort if medium_effort is defined else false -%}
{%- if low_effort and medium_effort -%}
{{- raise_exception('low_effort and medium_effort are both set; choose at most one') -}}
{%- endif -%}
{%- macro text_of(message, index) -%}
{%- if message.content is none or message.content is not defined -%}
{%- elif message.content is string -%}{{- message.content -}}
{%- else -%}{{- raise_exception('message ' ~ index ~ ' has non-string content; Nemotron 3 chat is text-only, pass a string') -}}
{%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
{%- if message.role not in ['system', 'user', 'assistant', 'tool'] -%}
{{- raise_exception('message ' ~ loop.index0 ~ ' has unknown role ' ~ message.role ~ '; use system, user, assistant or tool') -}}
{%- endif -%}
{%- if message.role == 'system' and not loop.first -%}
{{- raise_exception('system message at position ' ~ loop.index0 ~ '; a system message must come first') -}}
{%- endif -%}
{%- endfor -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set system = text_of(messages[0], 0) -%}
{%- set offset = 1 -%}
{%- else -%}
{%- set system = '' -%}
{%- set offset = 0 -%}
{%- endif -%}
{%- set turns = messages[offset:] -%}
{{- '<|im_start|>system\n' + system -}}
{%- if tools -%}
{%- if system -%}{{- '\n\n' -}}{%- endif -%}
{{- '"""
    + TOOLS_PREAMBLE.replace("\n", "\\n")
    + r"""<tools>' -}}
{%- for tool in tools -%}
{%- set spec = tool.function if tool.function is mapping else tool -%}
{%- if not spec.name -%}{{- raise_exception('tool declaration has no name; give each tool a name') -}}{%- endif -%}
{{- '\n<function>\n<name>' + spec.name + '</name>' -}}
{%- if spec.description -%}{{- '\n<description>' + spec.description | trim + '</description>' -}}{%- endif -%}
{{- '\n<parameters>' -}}
{%- set params = spec.parameters if spec.parameters is mapping else {} -%}
{%- if params.properties is mapping -%}
{%- for pname, pspec in params.properties.items() -%}
{{- '\n<parameter>\n<name>' + pname + '</name>' -}}
{%- if pspec.type is defined -%}{{- '\n<type>' ~ pspec.type ~ '</type>' -}}{%- endif -%}
{%- if pspec.description -%}{{- '\n<description>' + pspec.description | trim + '</description>' -}}{%- endif -%}
{%- if pspec.enum is defined -%}{{- '\n<enum>' + pspec.enum | tojson + '</enum>' -}}{%- endif -%}
{{- '\n</parameter>' -}}
{%- endfor -%}
{%- endif -%}
{%- if params.required is defined -%}{{- '\n<required>' + params.required | tojson + '</required>' -}}{%- endif -%}
{{- '\n</parameters>\n</function>' -}}
{%- endfor -%}
{{- '\n</tools>"""
    + TOOLS_INSTRUCTIONS.replace("\n", "\\n")
    + r"""' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- set ns = namespace(last_user=-1) -%}
{%- for message in turns -%}
{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in turns -%}
{%- set content = text_of(message, loop.index0 + offset) -%}
{%- if message.role == 'user' -%}
{%- if loop.index0 == ns.last_user and low_effort -%}{%- set content = content + '"""
    + LOW_EFFORT_SUFFIX.replace("\n", "\\n")
    + r"""' -%}{%- endif -%}
{%- if loop.index0 == ns.last_user and medium_effort -%}{%- set content = content + '"""
    + MEDIUM_EFFORT_SUFFIX.replace("\n", "\\n")
    + r"""' -%}{%- endif -%}
{{- '<|im_start|>user\n' + content + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{%- if message.reasoning_content is string -%}
{%- set reasoning = message.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
{%- set content = content.split('</think>')[-1] -%}
{%- else -%}
{%- set reasoning = '' -%}
{%- endif -%}
{%- set reasoning = reasoning.strip('\n') -%}
{%- set content = content.lstrip('\n') -%}
{%- if reasoning and not (truncate_history_thinking and loop.index0 < ns.last_user) -%}
{%- set body = '<think>\n' + reasoning + '\n</think>\n' + content -%}
{%- else -%}
{%- set body = '<think></think>' + content -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' -}}
{%- generation -%}
{{- body -}}
{%- if message.tool_calls -%}
{%- if not body.endswith('\n') -%}{{- '\n' -}}{%- endif -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is mapping else call -%}
{%- if not fn.name -%}{{- raise_exception('tool call without a function name; set function.name') -}}{%- endif -%}
{%- if fn.arguments is defined and fn.arguments is not none and fn.arguments is not mapping -%}
{{- raise_exception('tool call ' ~ fn.name ~ ' has non-dict arguments; pass a dict (json.loads a JSON string first)') -}}
{%- endif -%}
{{- '<tool_call>\n<function=' + fn.name + '>\n' -}}
{%- if fn.arguments is mapping -%}
{%- for key, value in fn.arguments.items() -%}
{{- '<parameter=' + key + '>\n' -}}
{%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}
{{- '\n</parameter>\n' -}}
{%- endfor -%}
{%- endif -%}
{{- '</function>\n</tool_call>\n' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>' -}}
{%- endgeneration -%}
{{- '\n' -}}
{%- else -%}
{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user\n' -}}{%- endif -%}
{{- '<tool_response>\n' + content + '\n</tool_response>\n' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking -%}{{- '<think>\n' -}}{%- else -%}{{- '<think></think>' -}}{%- endif -%}
{%- endif -%}
"""
).strip()
