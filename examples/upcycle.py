"""Upcycle a dense model into a Nemotron 3 MoE, check it computes the same function, and train it a little.

    python examples/upcycle.py path/to/llama out/moe --experts 8 --top-k 2 --granularity 1 --steps 20
    python examples/upcycle.py --tiny-dense out/dense out/moe --steps 20      # offline demo: a tiny Llama

Steps: (1) stream the dense checkpoint into a Nemotron 3 MoE checkpoint with ``upcycle_to_disk`` (layer by
layer, never the whole MoE in memory; ``nemotron3 upcycle SRC DST`` is the same call), (2) load both and
compare their logits on random tokens (equal up to float rounding at step 0 with the default settings:
expert copies without noise, exact weight scaling), (3) optionally continue training the MoE for
``--steps`` steps on a synthetic next-token task with the aux loss, printing the loss, and save it again.
``--tiny-dense DIR`` first writes a tiny random ``LlamaForCausalLM`` to DIR (the source for the demo).
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.upcycling import UpcyclingConfig, upcycle_to_disk


def build_tiny_dense(folder: str, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    dense.save_pretrained(folder)
    return folder


def synthetic_batch(step: int, vocab: int, rows: int = 8, length: int = 32) -> torch.Tensor:
    """Sequences that count up modulo the vocabulary from a random start: easy to learn."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (rows, 1), generator=g)
    return (start + torch.arange(length)) % vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense", nargs="?",
                        help="dense checkpoint folder (Llama / Mistral / Qwen2 / Qwen3 / Nemotron-H)")
    parser.add_argument("destination", help="folder for the MoE checkpoint (must not exist)")
    parser.add_argument("--tiny-dense", metavar="DIR", help="write a tiny random Llama to DIR and upcycle that")
    parser.add_argument("--experts", type=int, default=8, help="expansion E: copies of the dense FFN")
    parser.add_argument("--granularity", type=int, default=1, help="G: each copy cut into G experts")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--router", default="sigmoid")
    parser.add_argument("--steps", type=int, default=0, help="training steps after the check (0: none)")
    parser.add_argument("--lr", type=float, default=1e-3)
    cli = parser.parse_args()
    if (cli.dense is None) == (cli.tiny_dense is None):
        raise ValueError("pass a dense checkpoint folder, or --tiny-dense DIR for an offline demo (one of the two)")
    if cli.steps < 0:
        raise ValueError(f"--steps {cli.steps}: pass 0 or more")

    source = build_tiny_dense(cli.tiny_dense) if cli.tiny_dense else cli.dense
    config = UpcyclingConfig(num_experts=cli.experts, granularity=cli.granularity, top_k=cli.top_k,
                             router=cli.router)
    upcycle_to_disk(source, cli.destination, config)
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    moe = Nemotron3ForCausalLM.from_pretrained(cli.destination, dtype=torch.float32).eval()
    ids = synthetic_batch(10_000, dense.config.vocab_size, rows=2, length=16)
    with torch.no_grad():
        diff = (dense(ids).logits - moe(ids).logits).abs().max().item()
    c = moe.config
    print(f"upcycled {source} -> {cli.destination}: pattern {c.hybrid_override_pattern}, {c.n_routed_experts} "
          f"experts, top-{c.num_experts_per_tok}; max |logit difference| at step 0: {diff:.2e}")

    if cli.steps:
        moe.train()
        optimizer = torch.optim.AdamW(moe.parameters(), lr=cli.lr)
        losses = []
        for step in range(cli.steps):
            batch = synthetic_batch(step, c.vocab_size)
            out = moe(batch, labels=batch)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            moe.update_expert_bias()  # aux-loss-free balancing, as in Nemotron 3 training
            losses.append(out.lm_loss.item())
        moe.save_pretrained(cli.destination)
        print(f"trained {cli.steps} steps: lm loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved to {cli.destination}")
    print("files:", ", ".join(sorted(os.listdir(cli.destination))))


if __name__ == "__main__":
    main()
