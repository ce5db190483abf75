"""parse_assistant_output: reasoning / content / tool calls, bad output, round trips through the released
templates (Nano, Super, Ultra), compared with TRL's response parser for those templates."""

import pytest
from trl.chat_template_utils import add_response_schema

from transformers_nemotron3.generation import (
    InvalidToolCall,
    ToolCall,
    parse_assistant_output,
    render_chat,
)
from transformers_nemotron3.tokenizer import build_tiny_tokenizer

FAMILIES = ["nano", "super", "ultra"]

TOOLS = [
    {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "limit": {"type": "integer"}, "exact": {"type": "boolean"}},
        },
    }
]


def test_generated_text_after_thinking_prompt():
    # The prompt ended with "<think>\n", so the model's text starts inside the reasoning.
    parsed = parse_assistant_output("2 and 2 make 4.\n</think>\nThe answer is 4.<|im_end|>")
    assert parsed.reasoning == "2 and 2 make 4."
    assert parsed.content == "The answer is 4."
    assert parsed.tool_calls == [] and parsed.invalid_tool_calls == []
    assert not parsed.reasoning_truncated


def test_full_turn_with_think_tags():
    parsed = parse_assistant_output("<think>\nfirst\nsecond\n</think>\nDone.")
    assert (parsed.reasoning, parsed.content) == ("first\nsecond", "Done.")


def test_thinking_off_output_is_all_content():
    parsed = parse_assistant_output("Just the answer.</s>", enable_thinking=False)
    assert (parsed.reasoning, parsed.content, parsed.reasoning_truncated) == ("", "Just the answer.", False)


def test_missing_end_of_thinking_is_truncated_reasoning():
    parsed = parse_assistant_output("Let me consider the options and")
    assert parsed.reasoning == "Let me consider the options and"
    assert parsed.content == ""
    assert parsed.reasoning_truncated


def test_tool_calls_are_parsed_with_typed_arguments():
    text = (
        "Looking it up.\n</think>\nOne moment.\n"
        "<tool_call>\n<function=lookup>\n<parameter=code>\n007\n</parameter>\n"
        "<parameter=limit>\n3\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=ping>\n</function>\n</tool_call>\n"
    )
    parsed = parse_assistant_output(text, tools=TOOLS)
    assert parsed.content == "One moment."
    # "007" is a declared string and stays text; "3" for an integer becomes 3.
    assert parsed.tool_calls == [
        ToolCall("lookup", {"code": "007", "limit": 3}),
        ToolCall("ping", {}),
    ]


def test_multiline_parameter_value():
    text = "</think>\n<tool_call>\n<function=write>\n<parameter=body>\nline one\nline two\n</parameter>\n</function>\n</tool_call>"
    parsed = parse_assistant_output(text)
    assert parsed.tool_calls == [ToolCall("write", {"body": "line one\nline two"})]


@pytest.mark.parametrize(
    "block, error",
    [
        ("<tool_call>\n<function=lookup>\n<parameter=code>\nx\n", "missing </tool_call>"),
        ("<tool_call>\nlookup(code=1)\n</tool_call>", "expected <function=NAME>"),
        ("<tool_call>\n<function=lookup>\n<parameter=code>\nx\n</function>\n</tool_call>", "unexpected text"),
    ],
)
def test_malformed_tool_calls_are_reported_not_raised(block, error):
    parsed = parse_assistant_output("ok\n</think>\nSure.\n" + block)
    assert parsed.tool_calls == []
    assert len(parsed.invalid_tool_calls) == 1
    assert isinstance(parsed.invalid_tool_calls[0], InvalidToolCall)
    assert error in parsed.invalid_tool_calls[0].error
    assert parsed.invalid_tool_calls[0].text.startswith("<tool_call>")
    assert parsed.content == "Sure."


def test_unclosed_call_followed_by_good_call():
    text = "</think>\n<tool_call>\n<function=a>\n<tool_call>\n<function=b>\n</function>\n</tool_call>"
    parsed = parse_assistant_output(text)
    assert [c.name for c in parsed.tool_calls] == ["b"]
    assert parsed.invalid_tool_calls[0].error.startswith("missing </tool_call>")


def test_non_string_input_is_a_value_error():
    with pytest.raises(ValueError, match="decode the token ids"):
        parse_assistant_output([1, 2, 3])


ASSISTANT_TURNS = [
    {"role": "assistant", "content": "Plain answer."},
    {"role": "assistant", "reasoning_content": "Think a bit.\nThen more.", "content": "Answer."},
    {
        "role": "assistant",
        "reasoning_content": "Use the tool.",
        "content": "Calling.",
        "tool_calls": [{"type": "function", "function": {"name": "lookup",
                                                         "arguments": {"code": "42", "limit": 5, "exact": True}}}],
    },
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": {"code": "a b"}}},
            {"type": "function", "function": {"name": "lookup", "arguments": {"limit": 1, "exact": False}}},
        ],
    },
    {
        "role": "assistant",
        "reasoning_content": "Only a call.",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"code": "x\ny"}}}],
    },
]


@pytest.fixture(scope="module")
def trl_parsers():
    """Tiny tokenizers carrying each released template, with TRL's response template for it."""
    return {family: add_response_schema(build_tiny_tokenizer(chat_template_family=family)) for family in FAMILIES}


def generated_part(family, message, thinking):
    """What a model prompted by the released template would have generated for ``message``."""
    conversation = [{"role": "user", "content": "q"}, message]
    prompt = render_chat(conversation[:1], tools=TOOLS, family=family, add_generation_prompt=True,
                         enable_thinking=thinking)
    rendered = render_chat(conversation, tools=TOOLS, family=family)
    assert rendered.startswith(prompt)
    return prompt, rendered[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("message", ASSISTANT_TURNS)
def test_round_trip_from_generation_prompt(family, message):
    """Text generated after the prompt parses back to the message, which renders back to the same text."""
    thinking = bool(message.get("reasoning_content"))
    prompt, generated = generated_part(family, message, thinking)
    parsed = parse_assistant_output(generated, enable_thinking=thinking, tools=TOOLS)
    assert parsed.to_message() == message
    assert not parsed.reasoning_truncated and parsed.invalid_tool_calls == []
    rendered = render_chat([{"role": "user", "content": "q"}, parsed.to_message()], tools=TOOLS, family=family)
    assert rendered == prompt + generated


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("message", ASSISTANT_TURNS)
def test_round_trip_of_a_whole_rendered_turn(family, message):
    conversation = [{"role": "user", "content": "q"}, message]
    rendered = render_chat(conversation, tools=TOOLS, family=family)
    body = rendered.split("<|im_start|>assistant\n")[-1]
    parsed = parse_assistant_output(body, enable_thinking=False, tools=TOOLS)
    assert parsed.to_message() == message
    assert render_chat([conversation[0], parsed.to_message()], tools=TOOLS, family=family) == rendered


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("message", ASSISTANT_TURNS)
def test_parser_agrees_with_trls_response_template(trl_parsers, family, message):
    tokenizer = trl_parsers[family]
    thinking = bool(message.get("reasoning_content"))
    prompt, generated = generated_part(family, message, thinking)
    theirs = tokenizer.parse_response(tokenizer.encode(generated, add_special_tokens=False),
                                      prefix=tokenizer.encode(prompt, add_special_tokens=False), tools=TOOLS)
    ours = parse_assistant_output(generated, enable_thinking=thinking, tools=TOOLS).to_message()
    if not ours["content"]:
        ours.pop("content")  # TRL leaves out an empty content
    assert ours == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_history_turn_with_truncated_reasoning_parses_as_content(family):
    conversation = [{"role": "user", "content": "a"}, ASSISTANT_TURNS[1], {"role": "user", "content": "b"}]
    rendered = render_chat(conversation, family=family)
    body = rendered.split("<|im_start|>assistant\n")[1].split("<|im_start|>user")[0]
    assert "Think a bit" not in body and body.startswith("<think></think>")
    parsed = parse_assistant_output(body, enable_thinking=False)
    assert (parsed.reasoning, parsed.content) == ("", "Answer.")


def test_thinking_off_output_with_a_tool_call():
    text = "Sure.\n<tool_call>\n<function=lookup>\n<parameter=limit>\n2\n</parameter>\n</function>\n</tool_call>\n<|im_end|>"
    parsed = parse_assistant_output(text, enable_thinking=False, tools=TOOLS)
    assert (parsed.reasoning, parsed.content) == ("", "Sure.")
    assert parsed.tool_calls == [ToolCall("lookup", {"limit": 2})]
