"""The released Nemotron 3 chat templates, as TRL ships them, are what the package renders with.

Oracle: TRL's own template strings (``trl.chat_template_utils.nemotron_3_*_chat_template`` and
``get_training_chat_template``) rendered by transformers' ``apply_chat_template`` on a tiny offline
tokenizer. Checked for each family the package claims (Nano, Super, Ultra) on five kinds of
conversation: a system prompt, multi-turn with history reasoning truncated, thinking off, tools with
calls and responses, and a final assistant turn.
"""

import pytest
from trl import chat_template_utils as trl_templates

from transformers_nemotron3.generation import (
    CHAT_TEMPLATE_FAMILIES,
    chat_template_family,
    ensure_chat_template,
    released_chat_template,
    render_chat,
    render_tool_call,
    training_chat_template,
)
from transformers_nemotron3.tokenizer import build_tiny_tokenizer

FAMILIES = ["nano", "super", "ultra"]


def trl_template(family):
    return getattr(trl_templates, f"nemotron_3_{family}_chat_template")


@pytest.fixture(scope="module")
def tokenizers():
    return {family: build_tiny_tokenizer(chat_template_family=family) for family in FAMILIES}


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
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city"],
        },
    },
}

SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]

MULTI_TURN = [
    {"role": "user", "content": "Pick a number."},
    {"role": "assistant", "reasoning_content": "Seven is fine.", "content": "7"},
    {"role": "user", "content": "Double it."},
    {"role": "assistant", "content": "<think>\n7 * 2 = 14\n</think>\n14"},
    {"role": "user", "content": "And add 4?"},
]

THINKING_OFF = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "You help with travel."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "Need the tool.",
        "content": "Checking.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}},
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "<think>\nIt is warm.\n</think>\n21 C and sunny."},
    {"role": "user", "content": "And Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
    {"role": "tool", "content": "rain"},
]

FINAL_ASSISTANT = [
    {"role": "user", "content": "Pick a number."},
    {"role": "assistant", "reasoning_content": "Seven is fine.", "content": "7"},
    {"role": "user", "content": "Double it."},
    {"role": "assistant", "reasoning_content": "7 * 2 = 14", "content": "14"},
]

CONVERSATIONS = {
    "system": (SYSTEM, None),
    "multi_turn": (MULTI_TURN, None),
    "thinking_off": (THINKING_OFF, None),
    "tools": (TOOL_CONVERSATION, [WEATHER_TOOL]),
    "final_assistant": (FINAL_ASSISTANT, None),
}


def oracle(tokenizer, family, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=trl_template(family), **kwargs)


def test_templates_are_trls_files(tokenizers):
    for family in FAMILIES:
        assert released_chat_template(family) == trl_template(family)
        assert tokenizers[family].chat_template == trl_template(family)
        trained = getattr(trl_templates, f"nemotron_3_{family}_training_chat_template")
        assert training_chat_template(family) == trained
        assert trl_templates.get_training_chat_template(tokenizers[family]) == trained
    assert tuple(FAMILIES) == CHAT_TEMPLATE_FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("truncate", [True, False])
def test_render_chat_equals_released_template(tokenizers, family, kind, add_generation_prompt, enable_thinking,
                                              truncate):
    messages, tools = CONVERSATIONS[kind]
    kwargs = dict(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                  truncate_history_thinking=truncate)
    expected = oracle(tokenizers[family], family, messages, tools=tools, **kwargs)
    assert render_chat(messages, tools=tools, family=family, **kwargs) == expected
    assert tokenizers[family].apply_chat_template(messages, tools=tools, tokenize=False, **kwargs) == expected
    ids = tokenizers[family].apply_chat_template(messages, tools=tools, **kwargs)["input_ids"]
    assert ids == tokenizers[family].encode(expected, add_special_tokens=False)


def test_the_families_really_differ(tokenizers):
    """Guards against a test that compares a template with itself: the three render differently."""
    texts = {family: render_chat(MULTI_TURN, family=family) for family in FAMILIES}
    assert "<|im_start|>assistant\n<think></think>\n7<|im_end|>" in texts["nano"]  # the example
    assert "<|im_start|>assistant\n<think></think>7<|im_end|>" in texts["ultra"]
    final = {family: render_chat(FINAL_ASSISTANT, family=family) for family in FAMILIES}
    assert final["nano"] == final["super"] != final["ultra"]
    assert final["ultra"].endswith("<think>\n7 * 2 = 14</think>14<|im_end|>\n")


@pytest.mark.parametrize("family, flag", [("super", "low_effort"), ("ultra", "medium_effort")])
def test_effort_flags(tokenizers, family, flag):
    text = render_chat(MULTI_TURN, family=family, add_generation_prompt=True, **{flag: True})
    assert text == oracle(tokenizers[family], family, MULTI_TURN, add_generation_prompt=True, **{flag: True})
    suffix = "low" if flag == "low_effort" else "efficient"
    assert f"And add 4?\n\n{{reasoning effort: {suffix}}}<|im_end|>" in text
    assert text.count("{reasoning effort") == 1
    other = "nano" if family == "super" else "super"
    with pytest.raises(ValueError, match=f"{flag}=True is read only by the '{family}' template"):
        render_chat(MULTI_TURN, family=other, **{flag: True})


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_masks_equal_trl_training_template(tokenizers, family):
    tokenizer = tokenizers[family]
    trl_training = trl_templates.get_training_chat_template(tokenizer)
    for kind, (messages, tools) in CONVERSATIONS.items():
        ours = tokenizer.apply_chat_template(messages, tools=tools, chat_template=training_chat_template(family),
                                             return_assistant_tokens_mask=True, return_dict=True)
        theirs = tokenizer.apply_chat_template(messages, tools=tools, chat_template=trl_training,
                                               return_assistant_tokens_mask=True, return_dict=True)
        assert ours["input_ids"] == theirs["input_ids"], kind
        assert ours["assistant_masks"] == theirs["assistant_masks"], kind
        # Same text as the released template, and every assistant turn's <|im_end|> is trained.
        assert tokenizer.decode(ours["input_ids"]) == oracle(tokenizer, family, messages, tools=tools)
        masked = [t for t, keep in zip(ours["input_ids"], ours["assistant_masks"]) if keep]
        n_assistant = sum(m["role"] == "assistant" for m in messages)
        assert masked.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == n_assistant, kind


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arguments", [{"city": "Paris"}, {"city": "a b", "days": 2, "exact": True},
                                       {"filter": {"k": [1, 2]}, "tags": ["x", "y"]}, {}])
def test_render_tool_call_matches_the_templates(family, arguments):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    assert render_chat(messages, family=family).endswith(render_tool_call(call) + "<|im_end|>\n")


def test_chat_template_family_and_ensure():
    for family in FAMILIES:
        assert chat_template_family(released_chat_template(family)) == family
        assert chat_template_family(training_chat_template(family)) == family
        assert chat_template_family({"default": released_chat_template(family)}) == family
    assert chat_template_family("{{ messages }}") is None and chat_template_family(None) is None
    bare = build_tiny_tokenizer(chat_template_family=None)
    assert bare.chat_template is None
    assert ensure_chat_template(bare, "ultra").chat_template == trl_template("ultra")
    assert ensure_chat_template(bare, "nano").chat_template == trl_template("ultra")  # an existing one is kept


@pytest.mark.parametrize(
    "messages, kwargs, fragment",
    [
        ([{"role": "user", "content": "x"}], {"family": "mega"}, "family 'mega' is unknown"),
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
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], {}, "pass a string"),
        (["hello"], {}, "'role' string"),
    ],
)
def test_bad_input_is_rejected(messages, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        render_chat(messages, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_rollout_tool_turn_glue_equals_the_templates(family, enable_thinking):
    """The GRPO rollout appends tool results as text between turns; it must be what the template writes."""
    from transformers_nemotron3.trainers.rollout import tool_turn_text

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    turn = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    observations = [{"role": "tool", "content": '{"temp": 7}'}, {"role": "tool", "content": "rain"}]
    before = render_chat(turn, tools=[WEATHER_TOOL], family=family)
    after = render_chat(turn + observations, tools=[WEATHER_TOOL], family=family, add_generation_prompt=True,
                        enable_thinking=enable_thinking)
    assert before.endswith("<|im_end|>\n") and after.startswith(before)
    assert after[len(before) - 1:] == tool_turn_text(observations, enable_thinking)


def test_without_trl_the_core_imports_and_templates_name_the_extra(monkeypatch):
    import subprocess
    import sys

    from transformers_nemotron3.generation import chat_template

    code = ("import sys; import transformers_nemotron3.generation as g, transformers_nemotron3.tokenizer as t; "
            "g.released_chat_template('nano'); t.build_tiny_tokenizer(); print('trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # templates are read from TRL's files without importing trl

    real_find_spec = chat_template.importlib.util.find_spec
    monkeypatch.setattr(chat_template.importlib.util, "find_spec",
                        lambda name, *a: None if name == "trl" else real_find_spec(name, *a))
    chat_template._read_template.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"transformers-nemotron3\[trl\]"):
            released_chat_template("nano")
        assert build_tiny_tokenizer(chat_template_family=None).chat_template is None  # still builds without one
    finally:
        chat_template._read_template.cache_clear()
