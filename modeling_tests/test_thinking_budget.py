"""ThinkingBudgetLogitsProcessor: step-by-step on synthetic logits, and inside generate()."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from transformers_nemotron3.generation import ThinkingBudgetLogitsProcessor
from transformers_nemotron3.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False)


def thinking_length(row, think, end_think):
    """Tokens strictly between the last <think> and the first </think> after it (None if open)."""
    start = len(row) - 1 - row[::-1].index(think)
    after = row[start + 1 :]
    return after.index(end_think) if end_think in after else None


def run_steps(processor, prompts, vocab, steps, next_token):
    """Greedy decode with a scripted fake model: ``next_token(row, step)`` gets the top logit."""
    rows = [list(p) for p in prompts]
    for step in range(steps):
        scores = torch.randn(len(rows), vocab) * 0.1
        for i, row in enumerate(rows):
            scores[i, next_token(i, row, step)] = 5.0
        width = max(map(len, rows))  # left-pad like generate does for batches
        input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        out = processor(input_ids, scores)
        for i, row in enumerate(rows):
            row.append(int(out[i].argmax()))
    return rows


@pytest.mark.parametrize("budget, grace", [(0, 0), (1, 0), (5, 0), (5, 3), (12, 6)])
def test_thinking_is_capped_and_always_closed(tok, budget, grace):
    think, end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    word, newline = ids_of(tok, "a")[0], ids_of(tok, "\n")[0]
    processor = ThinkingBudgetLogitsProcessor(budget, grace, tokenizer=tok)
    prompt = ids_of(tok, "<|im_start|>assistant\n<think>\n")
    # Row 0 never wants to stop; row 1 puts a newline every 4th token.
    rows = run_steps(
        processor,
        [prompt, prompt],
        len(tok),
        steps=budget + grace + 6,
        next_token=lambda i, row, step: newline if (i == 1 and step % 4 == 3) else word,
    )
    for row in rows:
        length = thinking_length(row, think, end)
        assert length is not None, "</think> never appeared"
        assert length <= max(budget + grace, 1)  # the prompt's "\n" after <think> counts
        assert row.count(end) == 1  # forced once, not again and again
    # Without a newline the row runs the whole grace period.
    assert thinking_length(rows[0], think, end) == max(budget + grace, 1)


def test_grace_period_ends_at_the_first_newline(tok):
    think, end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    word, newline = ids_of(tok, "a")[0], ids_of(tok, "\n")[0]
    processor = ThinkingBudgetLogitsProcessor(4, 20, tokenizer=tok)
    prompt = ids_of(tok, "<|im_start|>assistant\n<think>")
    # Thinking tokens: a a a a a a \n ... ; budget reached at 4, newline is token 7.
    rows = run_steps(processor, [prompt], len(tok), 12, lambda i, row, step: newline if step == 6 else word)
    assert thinking_length(rows[0], think, end) == 7
    assert rows[0][len(prompt) + 6] == newline and rows[0][len(prompt) + 7] == end


def test_thinking_off_and_closed_rows_are_untouched(tok):
    processor = ThinkingBudgetLogitsProcessor(0, tokenizer=tok)
    off = ids_of(tok, "<|im_start|>assistant\n<think></think>")
    closed = ids_of(tok, "<|im_start|>assistant\n<think>\nshort\n</think>\nanswer text here")
    no_think = ids_of(tok, "<|im_start|>user\nhello there")
    for prompt in (off, closed, no_think):
        scores = torch.randn(1, len(tok))
        assert torch.equal(processor(torch.tensor([prompt]), scores), scores)


def test_multi_token_end_sequence_then_newline_forced_one_by_one():
    think, end, newline = [7], [100, 101, 102], 9
    processor = ThinkingBudgetLogitsProcessor(
        3, start_token_ids=think, end_token_ids=end, append_newline=True, newline_token_id=newline
    )
    rows = run_steps(processor, [[1, 7]], 200, 8, lambda i, row, step: 50)
    assert rows[0] == [1, 7, 50, 50, 50, 100, 101, 102, 9, 50]


def test_in_generate_with_a_tiny_model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    think, end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    messages = [{"role": "user", "content": "Think hard."}]
    budget, grace = 6, 4
    processors = LogitsProcessorList([ThinkingBudgetLogitsProcessor(budget, grace, tokenizer=tok)])

    on = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**on, logits_processor=processors, max_new_tokens=20, do_sample=True, top_k=0)
    length = thinking_length(out[0].tolist(), think, end)
    assert length is not None and length <= budget + grace

    off = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, return_tensors="pt")
    assert tok.decode(off["input_ids"][0]).endswith("<think></think>")
    plain = model.generate(**off, max_new_tokens=10, do_sample=False)
    budgeted = model.generate(**off, logits_processor=processors, max_new_tokens=10, do_sample=False)
    assert torch.equal(plain, budgeted)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"thinking_budget": -1, "start_token_ids": [1], "end_token_ids": [2]}, "thinking_budget=-1"),
        ({"thinking_budget": 4, "grace_period": -2, "start_token_ids": [1], "end_token_ids": [2]}, "grace_period=-2"),
        ({"thinking_budget": 4, "grace_period": 3, "start_token_ids": [1], "end_token_ids": [2]}, "newline"),
        ({"thinking_budget": 4}, "pass tokenizer="),
        ({"thinking_budget": 4, "start_token_ids": [1], "end_token_ids": [2], "append_newline": True}, "pass tokenizer="),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ThinkingBudgetLogitsProcessor(**kwargs)


@pytest.mark.parametrize("family, grace, append_newline", [("nano", 8, True), ("super", 8, True), ("ultra", 0, False)])
def test_budgeted_turn_is_what_the_released_template_writes(family, grace, append_newline):
    """A turn ended by the processor parses back to a message that the family's template renders identically."""
    from transformers_nemotron3.generation import parse_assistant_output, render_chat

    tok = build_tiny_tokenizer(chat_template_family=family)
    messages = [{"role": "user", "content": "Think hard."}]
    prompt_text = render_chat(messages, family=family, add_generation_prompt=True)
    prompt = ids_of(tok, prompt_text)
    end, im_end = tok.convert_tokens_to_ids("</think>"), tok.convert_tokens_to_ids("<|im_end|>")
    word, newline = ids_of(tok, "a")[0], ids_of(tok, "\n")[0]
    processor = ThinkingBudgetLogitsProcessor(4, grace, tokenizer=tok, append_newline=append_newline)

    def next_token(i, row, step):  # reasoning "a a a a a \n a ...", then two answer tokens and <|im_end|>
        new = row[len(prompt):]
        if end in new:
            return im_end if len(new) - new.index(end) - append_newline > 2 else word
        return newline if step == 5 else word

    row = run_steps(processor, [prompt], len(tok), 16, next_token)[0]
    generated = row[len(prompt): row.index(im_end, len(prompt)) + 1]
    assert end in generated
    text = tok.decode(generated)
    message = parse_assistant_output(text).to_message()
    assert message["reasoning_content"] and message["content"]
    assert render_chat(messages + [message], family=family) == prompt_text + text + "\n"
