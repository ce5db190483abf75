"""A tiny Nemotron 3 style tokenizer, trained on the spot, for tests, examples and the CLI.

The real Nemotron 3 tokenizer (131k byte-level BPE tokens) lives on the Hugging Face Hub;
tests and offline examples cannot fetch it. ``build_tiny_tokenizer`` trains a small byte-level
BPE on a built-in corpus (well under a second) with the same special tokens, each a single id,
and the chat template released with the Nano (or Super / Ultra) checkpoints, read from TRL (see
``generation/chat_template.py``), so the whole chat / thinking / tool-call pipeline runs offline. Token ids of ordinary text differ from the real tokenizer; only the special-token
layout below is fixed.

=====  =====================  ===========================================
id     token                  role
=====  =====================  ===========================================
0      ``<unk>``              unknown and padding (``pad_token_id = 0``)
1      ``<s>``                beginning of sequence
2      ``</s>``               end of sequence (``eos_token``)
3      ``<think>``            opens reasoning
4      ``</think>``           closes reasoning
5, 6   ``<tool_call>`` pair   wraps a tool call
7, 8   ``<tool_response>``    wraps a tool result
9      ``<SPECIAL_9>``        reserved
10     ``<|im_start|>``       opens a chat turn
11     ``<|im_end|>``         closes a chat turn (stop on ids 2 and 11)
=====  =====================  ===========================================

``<|im_end|>`` sits at 11 as in the released checkpoints (Super's ``eos_token_id`` is
``[2, 11]``); the other ids are our choice.

Chat generation stops on end-of-turn: :func:`end_of_turn_token_ids` gives ``</s>`` and ``<|im_end|>``
for any tokenizer, :func:`set_end_of_turn_eos` writes them into a model's ``generation_config`` (as
the published Nemotron 3 ``generation_config.json`` files do), so a saved checkpoint stops there too.
"""

from __future__ import annotations

from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .generation.chat_template import released_chat_template

__all__ = ["SPECIAL_TOKENS", "TINY_CORPUS", "build_tiny_tokenizer", "end_of_turn_token_ids", "set_end_of_turn_eos"]

SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<SPECIAL_9>",
    "<|im_start|>",
    "<|im_end|>",
)

TINY_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. A small model learns from a small corpus.",
    "Nemotron 3 is a hybrid Mamba and attention mixture of experts language model.",
    "system user assistant tool function parameter name type description required",
    "Let me think step by step. First, add the two numbers. Then check the result.",
    "What is the weather in Paris today? It is sunny and 21 degrees.",
    "The answer is 42.\nThe capital of France is Paris.\nTwo plus two equals four.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    '{"city": "Paris", "unit": "celsius", "days": 3, "ok": true}',
    "get_weather search_web calculator city query expression string integer object",
    "Hello! How can I help you today? Thanks, that was helpful. Goodbye.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > : ; , . ! ?",
    "reasoning effort low efficient budget grace newline end of thinking",
)


def build_tiny_tokenizer(
    vocab_size: int = 512,
    extra_texts: Iterable[str] | None = None,
    chat_template_family: str | None = "nano",
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE with Nemotron 3 special tokens and a released chat template.

    Args:
        vocab_size: total vocabulary size including the 12 special tokens and 256 byte
            tokens; at least 300. The trainer may stop early when the corpus has no more
            merges, so ``len(tokenizer) <= vocab_size``.
        extra_texts: more training text, appended to the built-in :data:`TINY_CORPUS`.
        chat_template_family: whose released chat template to carry (``"nano"``, ``"super"``,
            ``"ultra"``); None for a tokenizer without one (then TRL is not needed).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``bos_token="<s>"``, ``eos_token="</s>"``,
        ``pad_token=unk_token="<unk>"`` and the released ``chat_template`` set, so
        ``tokenizer.apply_chat_template(messages, enable_thinking=False, ...)`` works.
        Every string encodes (byte fallback), and decoding reproduces the text exactly.
    """
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size!r} is too small; use at least 300 (12 special + 256 bytes)")
    texts = list(TINY_CORPUS) + list(extra_texts or [])

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )
    if chat_template_family is not None:
        tokenizer.chat_template = released_chat_template(chat_template_family)
    return tokenizer


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids chat generation stops on: ``</s>`` (the eos token) and ``<|im_end|>``, those present.

    In the order of the published configs (``[2, 11]`` on the released tokenizer). Pass the result
    as ``generate(eos_token_id=...)`` or store it with :func:`set_end_of_turn_eos`.

    Raises:
        ValueError: the tokenizer has neither an eos token nor ``<|im_end|>``.
    """
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id, vocab.get("<|im_end|>")]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token and no <|im_end|>; set tokenizer.eos_token")
    return ids


def set_end_of_turn_eos(target: Any, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Make ``target``'s generation config stop on :func:`end_of_turn_token_ids` ``(tokenizer)``.

    Args:
        target: a model (its ``generation_config`` is changed) or a ``GenerationConfig``.
        tokenizer: the tokenizer saved with the model.

    Returns:
        The changed ``GenerationConfig``; ``save_pretrained`` writes it to ``generation_config.json``.
        Its ``pad_token_id`` is set from the tokenizer when it has none.
    """
    config = target if isinstance(target, GenerationConfig) else getattr(target, "generation_config", None)
    if not isinstance(config, GenerationConfig):
        raise ValueError(f"{type(target).__name__} has no generation_config; pass a model or a GenerationConfig")
    config.eos_token_id = end_of_turn_token_ids(tokenizer)
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    return config
