"""Short BF16-vs-NVFP4 training check on the tiny Nemotron 3 (the 200-step run is scripts/bench_nvfp4.py)."""

from __future__ import annotations

import torch
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.nvfp4 import NVFP4Linear, prepare_nvfp4

STEPS, BATCH, SEQ = 40, 4, 32


def _markov_batches(vocab: int) -> list[torch.Tensor]:
    """A fixed random Markov chain with 3 successors per token (learnable, loss floor ~0.9)."""
    g = torch.Generator().manual_seed(0)
    succ = torch.randint(3, vocab, (vocab, 3), generator=g)
    probs = torch.tensor([0.6, 0.3, 0.1])
    batches = []
    for _ in range(STEPS):
        x = torch.empty(BATCH, SEQ, dtype=torch.long)
        x[:, 0] = torch.randint(3, vocab, (BATCH,), generator=g)
        for t in range(1, SEQ):
            x[:, t] = succ[x[:, t - 1], torch.multinomial(probs, BATCH, replacement=True, generator=g)]
        batches.append(x)
    return batches


def _train(nvfp4: bool, batches: list[torch.Tensor]) -> list[float]:
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).train()
    if nvfp4:
        prepare_nvfp4(model, backend="emulation")
        assert any(isinstance(m, NVFP4Linear) for m in model.modules())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for ids in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_nvfp4_training_tracks_bf16_loss():
    batches = _markov_batches(tiny_config("all_blocks").vocab_size)
    bf16, nvfp4 = _train(False, batches), _train(True, batches)
    tail = lambda ls: sum(ls[-5:]) / 5  # noqa: E731
    assert tail(bf16) < 0.75 * bf16[0], bf16  # the run really learns
    assert tail(nvfp4) < 0.75 * nvfp4[0], nvfp4
    assert nvfp4 != bf16  # the NVFP4 run really is quantized
    gap = abs(tail(nvfp4) - tail(bf16)) / tail(bf16)
    assert gap < 0.03, (gap, tail(bf16), tail(nvfp4))
