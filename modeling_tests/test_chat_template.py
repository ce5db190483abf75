"""The Nemotron 3 chat template: Jinja (through apply_chat_template) and render_chat agree,
and both match strings written out by hand."""

import jinja2
import pytest

from transformers_nemotron3.generation import render_chat
from transformers_nemotron3.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def render_both(tokenizer, messages, tools=None, **kwargs):
    """Render with the Python renderer and the Jinja template; they must agree."""
    python = render_chat(messages, tools=tools, **kwargs)
    jinja = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
    assert jinja == python
    return python


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name."},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}


def test_plain_single_turn_gets_an_empty_system_turn(tokenizer):
    text = render_both(tokenizer, [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_generation_prompt_thinking_on(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = render_both(tokenizer, messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_generation_prompt_thinking_off_ends_with_empty_think(tokenizer):
    messages = [{"role": "user", "content": "2+2?"}]
    text = render_both(tokenizer, messages, add_generation_prompt=True, enable_thinking=False)
    assert text == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>"
    )


MULTI_TURN = [
    {"role": "user", "content": "Pick a number."},
    {"role": "assistant", "reasoning_content": "Seven is fine.", "content": "7"},
    {"role": "user", "content": "Double it."},
    {"role": "assistant", "content": "<think>\n7 * 2 = 14\n</think>\n14"},
]


def test_multi_turn_truncates_history_thinking_by_default(tokenizer):
    text = render_both(tokenizer, MULTI_TURN)
    assert text == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nPick a number.<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>7<|im_end|>\n"
        "<|im_start|>user\nDouble it.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n7 * 2 = 14\n</think>\n14<|im_end|>\n"
    )


def test_multi_turn_keeps_history_thinking_when_asked(tokenizer):
    text = render_both(tokenizer, MULTI_TURN, truncate_history_thinking=False)
    assert "<|im_start|>assistant\n<think>\nSeven is fine.\n</think>\n7<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n7 * 2 = 14\n</think>\n14<|im_end|>\n")


def test_assistant_without_reasoning_gets_empty_think(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = render_both(tokenizer, messages)
    assert text.endswith("<|im_start|>assistant\n<think></think>Hello!<|im_end|>\n")


def test_effort_flags_append_to_last_user_message_only(tokenizer):
    messages = MULTI_TURN[:3]
    low = render_both(tokenizer, messages, add_generation_prompt=True, low_effort=True)
    assert "Pick a number.<|im_end|>" in low
    assert "<|im_start|>user\nDouble it.\n\n{reasoning effort: low}<|im_end|>\n" in low
    medium = render_both(tokenizer, messages, medium_effort=True)
    assert "<|im_start|>user\nDouble it.\n\n{reasoning effort: efficient}<|im_end|>\n" in medium


TOOL_CONVERSATION = [
    {"role": "system", "content": "You help with travel."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "Need the tool.",
        "content": "Checking.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "<think>\nIt is warm.\n</think>\n21 C and sunny."},
]

TOOL_EXPECTED = (
    "<|im_start|>system\nYou help with travel.\n\n"
    "# Tools\n\nYou have access to the following functions:\n\n"
    "<tools>\n<function>\n<name>get_weather</name>\n"
    "<description>Current weather for a city.</description>\n"
    "<parameters>\n"
    "<parameter>\n<name>city</name>\n<type>string</type>\n<description>City name.</description>\n</parameter>\n"
    '<parameter>\n<name>unit</name>\n<type>string</type>\n<enum>["celsius", "fahrenheit"]</enum>\n</parameter>\n'
    '<required>["city"]</required>\n'
    "</parameters>\n</function>\n</tools>\n\n"
    "To call a function, reply with exactly this format and nothing after it:\n\n"
    "<tool_call>\n<function=function_name>\n<parameter=parameter_name>\nvalue\n</parameter>\n"
    "</function>\n</tool_call><|im_end|>\n"
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nNeed the tool.\n</think>\nChecking.\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n"
    "<tool_response>\nsunny\n</tool_response>\n<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nIt is warm.\n</think>\n21 C and sunny.<|im_end|>\n"
)


def test_tool_calling_conversation(tokenizer):
    # Assistant turns after the last user message keep their reasoning (tool loop).
    assert render_both(tokenizer, TOOL_CONVERSATION, tools=[WEATHER_TOOL]) == TOOL_EXPECTED


def test_tool_call_without_content_or_reasoning(tokenizer):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
    ]
    text = render_both(tokenizer, messages)
    assert text.endswith(
        "<|im_start|>assistant\n<think></think>\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n"
    )


def test_tools_without_system_prompt_start_the_system_turn(tokenizer):
    text = render_both(tokenizer, [{"role": "user", "content": "x"}], tools=[WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\n# Tools\n\n")


@pytest.mark.parametrize(
    "messages, kwargs, fragment",
    [
        ([{"role": "robot", "content": "x"}], {}, "unknown role"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], {}, "must come first"),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
            {},
            "function name",
        ),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]}],
            {},
            "json.loads",
        ),
        ([{"role": "user", "content": "x"}], {"low_effort": True, "medium_effort": True}, "choose at most one"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], {}, "pass a string"),
    ],
)
def test_bad_input_is_rejected_by_both(tokenizer, messages, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        render_chat(messages, **kwargs)
    with pytest.raises(jinja2.TemplateError, match=fragment):
        tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_render_chat_token_ids_match_apply_chat_template(tokenizer):
    ids = tokenizer.apply_chat_template(MULTI_TURN, add_generation_prompt=True)["input_ids"]
    expected = tokenizer.encode(render_chat(MULTI_TURN, add_generation_prompt=True), add_special_tokens=False)
    assert ids == expected
    assert tokenizer.convert_tokens_to_ids("<think>") in ids


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("effort", [{}, {"low_effort": True}, {"medium_effort": True}])
@pytest.mark.parametrize("conversation", ["multi", "tools"])
def test_python_and_jinja_agree_for_every_flag_combination(tokenizer, enable_thinking, truncate, effort, conversation):
    messages, tools = (MULTI_TURN, None) if conversation == "multi" else (TOOL_CONVERSATION, [WEATHER_TOOL])
    for add_generation_prompt in (False, True):
        render_both(
            tokenizer,
            messages,
            tools=tools,
            enable_thinking=enable_thinking,
            truncate_history_thinking=truncate,
            add_generation_prompt=add_generation_prompt,
            **effort,
        )


def test_assistant_tokens_mask_covers_assistant_bodies_only(tokenizer):
    # The template marks assistant output with {% generation %} for assistant-only SFT loss.
    out = tokenizer.apply_chat_template(MULTI_TURN, return_assistant_tokens_mask=True, return_dict=True)
    kept = [i for i, keep in zip(out["input_ids"], out["assistant_masks"]) if keep]
    assert tokenizer.decode(kept) == "<think></think>7<|im_end|><think>\n7 * 2 = 14\n</think>\n14<|im_end|>"
