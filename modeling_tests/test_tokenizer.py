"""build_tiny_tokenizer: special-token layout, round trips, released chat template, save/load; end-of-turn eos."""

import time

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, LogitsProcessor
from trl import chat_template_utils as trl_templates

from transformers_nemotron3.tokenizer import (
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    end_of_turn_token_ids,
    set_end_of_turn_eos,
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_special_token_ids(tok):
    expected = {
        "<unk>": 0, "<s>": 1, "</s>": 2, "<think>": 3, "</think>": 4, "<tool_call>": 5,
        "</tool_call>": 6, "<tool_response>": 7, "</tool_response>": 8, "<|im_start|>": 10, "<|im_end|>": 11,
    }
    for token, token_id in expected.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 0)
    assert len(SPECIAL_TOKENS) == 12


def test_special_tokens_encode_to_single_ids(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\nx</think><tool_call></tool_call><|im_end|>", add_special_tokens=False)
    assert ids[0] == 10 and ids[-1] == 11
    for special in (3, 4, 5, 6):
        assert ids.count(special) == 1


@pytest.mark.parametrize("text", ["Hello world!", "naïve café 漢字 🙂", "  two  spaces\n\ttab", "<think>\nhm\n</think>\nok"])
def test_decode_reproduces_any_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_vocab_size_and_extra_texts():
    small = build_tiny_tokenizer(vocab_size=300)
    assert len(small) <= 300
    word = "zyxwvutsrq"
    grown = build_tiny_tokenizer(vocab_size=600, extra_texts=[f"{word} " * 50])
    assert len(grown.encode(word, add_special_tokens=False)) < len(small.encode(word, add_special_tokens=False))


def test_is_fast_and_deterministic():
    start = time.perf_counter()
    first = build_tiny_tokenizer()
    assert time.perf_counter() - start < 5.0  # "about a second" with slack for a busy 2-core box
    assert first.get_vocab() == build_tiny_tokenizer().get_vocab()


def test_chat_template_is_the_released_one(tok):
    assert tok.chat_template == trl_templates.nemotron_3_nano_chat_template
    for family in ("super", "ultra"):
        chosen = build_tiny_tokenizer(chat_template_family=family).chat_template
        assert chosen == getattr(trl_templates, f"nemotron_3_{family}_chat_template")
    assert build_tiny_tokenizer(chat_template_family=None).chat_template is None
    with pytest.raises(ValueError, match="family 'mega'"):
        build_tiny_tokenizer(chat_template_family="mega")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think></think>")


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nWeather?<|im_end|>\n"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.chat_template == tok.chat_template == trl_templates.nemotron_3_nano_chat_template
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == tok.chat_template
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 2


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tiny_tokenizer(vocab_size=100)


def test_end_of_turn_token_ids(tok):
    assert end_of_turn_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")] == [2, 11]
    plain = build_tiny_tokenizer(chat_template_family=None)
    plain.eos_token = "<|im_end|>"  # an eos that is <|im_end|> itself is listed once
    assert end_of_turn_token_ids(plain) == [11]


class _ForceAt(LogitsProcessor):
    """Scripted sampling: token ``token`` at step ``step``, a fixed ordinary token before."""

    def __init__(self, prompt_length, step, token, filler):
        self.prompt_length, self.step, self.token, self.filler = prompt_length, step, token, filler

    def __call__(self, input_ids, scores):
        scores = torch.full_like(scores, float("-inf"))
        done = input_ids.shape[1] - self.prompt_length
        scores[:, self.token if done == self.step else self.filler] = 0.0
        return scores


def test_saved_generation_config_stops_on_end_of_turn(tok, tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.generation_config.eos_token_id = tok.eos_token_id
    config = set_end_of_turn_eos(model, tok)
    assert config is model.generation_config and config.eos_token_id == [2, 11] and config.pad_token_id == 0
    model.save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [2, 11]

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                     enable_thinking=False, return_tensors="pt", return_dict=True)["input_ids"]
    filler = tok.encode("a", add_special_tokens=False)[0]
    out = reloaded.generate(prompt, max_new_tokens=10, do_sample=False,
                            logits_processor=[_ForceAt(prompt.shape[1], 3, 11, filler)])
    assert out[0, prompt.shape[1]:].tolist() == [filler] * 3 + [11]  # stopped on <|im_end|>, not at 10 tokens

    standalone = set_end_of_turn_eos(GenerationConfig(), tok)
    assert standalone.eos_token_id == [2, 11]
    with pytest.raises(ValueError, match="generation_config"):
        set_end_of_turn_eos(object(), tok)
