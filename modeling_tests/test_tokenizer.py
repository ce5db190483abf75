"""build_tiny_tokenizer: special-token layout, round trips, chat template, save/load."""

import time

import pytest
from transformers import AutoTokenizer

from transformers_nemotron3.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer


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


def test_chat_template_is_set(tok):
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think></think>"


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nWeather?<|im_end|>\n"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.chat_template == tok.chat_template
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 2


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tiny_tokenizer(vocab_size=100)
