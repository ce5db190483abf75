"""Chat with a Nemotron 3 checkpoint: thinking on or off, and a thinking budget.

    python examples/chat.py path/to/checkpoint --prompt "What is 17 * 3?"                 # thinking on
    python examples/chat.py path/to/checkpoint --prompt "What is 17 * 3?" --thinking off
    python examples/chat.py path/to/checkpoint --budget 256 --grace 32                    # cap the reasoning
    python examples/chat.py path/to/checkpoint --interactive                              # a conversation
    python examples/chat.py --build-tiny out/tiny-chat --prompt "Hi" --budget 4           # offline demo

The checkpoint is a folder (or Hub id) with the model and its tokenizer, e.g. an official Nemotron 3 release
or anything `save_pretrained` wrote. The prompt goes through the tokenizer's chat template with
``enable_thinking``; with thinking on, ``--budget N`` adds a ``ThinkingBudgetLogitsProcessor`` that forces
``</think>`` after N reasoning tokens (plus up to ``--grace`` tokens waiting for a newline). The reply is
split into reasoning and answer with ``parse_assistant_output``, and in ``--interactive`` mode goes back
into the history (earlier turns' reasoning is dropped by the template). ``--build-tiny DIR`` first writes a
tiny random-weight checkpoint with the package's tiny tokenizer (its text is noise, but every step runs).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer, LogitsProcessorList

from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM
from transformers_nemotron3.generation import ThinkingBudgetLogitsProcessor, parse_assistant_output


def build_tiny_checkpoint(folder: str, seed: int = 0) -> str:
    """A tiny random Nemotron 3 (Mamba, attention, MoE) and the tiny tokenizer, saved to ``folder``."""
    from transformers_nemotron3.tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    config = Nemotron3Config(
        vocab_size=len(tokenizer), hidden_size=64, hybrid_override_pattern="M*E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
        chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    Nemotron3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reply(model, tokenizer, messages: list[dict], thinking: bool, budget: int | None, grace: int,
          max_new_tokens: int, sample: bool):
    """Generate one assistant turn; returns (parsed output, generated ids, seconds)."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking,
                                           return_tensors="pt", return_dict=True)
    processors = LogitsProcessorList()
    if thinking and budget is not None:
        processors.append(ThinkingBudgetLogitsProcessor(budget, grace_period=grace, tokenizer=tokenizer))
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample, logits_processor=processors,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=False)
    parsed = parse_assistant_output(text, enable_thinking=thinking)  # thinking on: text starts in the reasoning
    return parsed, new, time.perf_counter() - start


def reasoning_length(ids: list[int], tokenizer) -> int:
    """Generated tokens before the first ``</think>`` (all of them when it never came)."""
    end = tokenizer.encode("</think>", add_special_tokens=False)
    for i in range(len(ids) - len(end) + 1):
        if ids[i:i + len(end)] == end:
            return i
    return len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="model folder or Hub id (with its tokenizer)")
    parser.add_argument("--build-tiny", metavar="DIR", help="write a tiny random checkpoint to DIR and use it")
    parser.add_argument("--prompt", default="What is 2 + 3? Answer in one sentence.")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--thinking", choices=["on", "off"], default="on")
    parser.add_argument("--budget", type=int, default=None, help="most reasoning tokens (thinking on)")
    parser.add_argument("--grace", type=int, default=0, help="extra tokens to end the reasoning on a newline")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--interactive", action="store_true", help="read user turns from stdin until EOF")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cli = parser.parse_args()
    if (cli.checkpoint is None) == (cli.build_tiny is None):
        raise ValueError("pass a checkpoint folder, or --build-tiny DIR for an offline demo (one of the two)")
    if cli.budget is not None and cli.thinking == "off":
        raise ValueError(f"--budget {cli.budget} limits reasoning, but --thinking off has none; drop one of them")
    if cli.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {cli.max_new_tokens}: pass at least 1")

    path = build_tiny_checkpoint(cli.build_tiny) if cli.build_tiny else cli.checkpoint
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {path} has no chat_template; save one with the checkpoint")
    model = Nemotron3ForCausalLM.from_pretrained(path, dtype=getattr(torch, cli.dtype)).eval()
    thinking = cli.thinking == "on"
    print(f"loaded {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, thinking "
          f"{cli.thinking}" + (f", budget {cli.budget} (+{cli.grace} grace)" if cli.budget is not None else ""))

    messages = [{"role": "system", "content": cli.system}] if cli.system else []
    turns = [cli.prompt] if not cli.interactive else None
    while True:
        if turns is not None:
            if not turns:
                break
            user = turns.pop(0)
        else:
            try:
                user = input("user> ")
            except EOFError:
                break
        messages.append({"role": "user", "content": user})
        parsed, ids, seconds = reply(model, tokenizer, messages, thinking, cli.budget, cli.grace,
                                     cli.max_new_tokens, cli.sample)
        if thinking:
            state = "unfinished: --max-new-tokens ran out" if parsed.reasoning_truncated else "closed"
            print(f"[reasoning: {reasoning_length(ids, tokenizer)} generated tokens, {state}] {parsed.reasoning!r}")
        print(f"[answer] {parsed.content!r}")
        print(f"({len(ids)} tokens in {seconds:.2f}s)")
        messages.append(parsed.to_message())


if __name__ == "__main__":
    main()
