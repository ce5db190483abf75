"""After upcycling, training continues from the dense model's loss, not from a random model's."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.upcycling import UpcyclingConfig, upcycle

VOCAB = 64


def _batch(gen: torch.Generator, table: torch.Tensor, n: int = 16, length: int = 24) -> torch.Tensor:
    """Synthetic language: a fixed random successor table with 10 % noise tokens."""
    seq = [torch.randint(0, VOCAB, (n,), generator=gen)]
    for _ in range(length - 1):
        nxt = table[seq[-1]]
        noise = torch.rand(n, generator=gen) < 0.1
        seq.append(torch.where(noise, torch.randint(0, VOCAB, (n,), generator=gen), nxt))
    return torch.stack(seq, dim=1)


def test_few_steps_after_upcycling_start_from_dense_loss():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(VOCAB, generator=gen)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-2)
    for _ in range(40):
        ids = _batch(gen, table)
        loss = dense(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    dense.eval()
    held_out = [_batch(torch.Generator().manual_seed(100 + i), table) for i in range(3)]
    with torch.no_grad():
        dense_losses = [dense(ids, labels=ids).loss.item() for ids in held_out]
    dense_loss = sum(dense_losses) / len(dense_losses)
    assert dense_loss < 0.6 * math.log(VOCAB)  # the dense model did learn something

    cfg = UpcyclingConfig(num_experts=4, granularity=2, top_k=2)
    moe = upcycle(dense, cfg)
    moe.train()
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-4)
    losses = []
    for ids in held_out:  # a few optimizer steps; loss measured before each step
        out = moe(ids, labels=ids)
        losses.append(out.lm_loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    moe.eval()
    with torch.no_grad():
        after = sum(moe(ids, labels=ids).lm_loss.item() for ids in held_out) / len(held_out)
    assert abs(losses[0] - dense_losses[0]) < 1e-4  # step 0: the dense function itself
    for value, ref in zip(losses, dense_losses):  # each step starts within 1 % of the dense loss on its batch
        assert abs(value - ref) / ref < 0.01, (losses, dense_losses)
    assert after < dense_loss * 1.01, (after, dense_loss)  # the steps did not knock it off the dense minimum

    # the same MoE from random weights starts near log(V): upcycling is what carried the dense model over
    scratch = Nemotron3ForCausalLM(moe.config).eval()
    with torch.no_grad():
        scratch_loss = scratch(held_out[0], labels=held_out[0]).lm_loss.item()
    assert scratch_loss > 1.5 * dense_loss
