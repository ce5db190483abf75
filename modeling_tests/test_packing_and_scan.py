"""Packed sequences stay apart; the chunked SSD scan equals the step-by-step recurrence (forward and backward)."""

from __future__ import annotations

import pytest
import torch
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.modeling.ssd import ssd_chunked, ssd_reference, ssd_step


def _inputs(b=2, length=19, h=4, p=3, g=2, n=5, requires_grad=False):
    x = torch.randn(b, length, h, p)
    dt = torch.rand(b, length, h) * 0.5 + 0.01
    A = -torch.rand(h) - 0.1
    B, C = torch.randn(b, length, g, n), torch.randn(b, length, g, n)
    D = torch.randn(h)
    init = torch.randn(b, h, p, n)
    ts = [x, dt, A, B, C, D, init]
    if requires_grad:
        ts = [t.clone().requires_grad_(True) for t in ts]
    return ts


@pytest.mark.parametrize("chunk", [4, 8, 32])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_scan_equals_recurrence_forward_backward(chunk, packed):
    x, dt, A, B, C, D, init = _inputs(requires_grad=True)
    seq = torch.tensor([[0] * 6 + [1] * 9 + [2] * 4, [0] * 13 + [1] * 6]) if packed else None
    y1, s1 = ssd_chunked(x, dt, A, B, C, chunk, D, init, seq)
    y2, s2 = ssd_reference(x, dt, A, B, C, D, init, seq)
    assert (y1 - y2).abs().max() < 1e-4 and (s1 - s2).abs().max() < 1e-4
    w1, w2 = torch.randn_like(y1), torch.randn_like(s1)
    g1 = torch.autograd.grad((y1 * w1).sum() + (s1 * w2).sum(), [x, dt, A, B, C, D, init])
    g2 = torch.autograd.grad((y2 * w1).sum() + (s2 * w2).sum(), [x, dt, A, B, C, D, init])
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-3 * (1 + b.abs().max())


def test_decode_step_equals_recurrence():
    x, dt, A, B, C, D, init = _inputs(b=3, length=7)
    state = init.clone()
    ys = torch.stack([ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(7)], dim=1)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D, init)
    assert (ys - y_ref).abs().max() < 1e-5 and (state - s_ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp"])
def test_packed_row_equals_separate_sequences(name):
    model = Nemotron3ForCausalLM(tiny_config(name)).eval()
    a, b = torch.randint(3, 96, (11,)), torch.randint(3, 96, (14,))  # 11 is not a multiple of chunk_size 8
    packed = torch.cat([a, b])[None]
    position_ids = torch.cat([torch.arange(11), torch.arange(14)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids).logits[0]
        sep = torch.cat([model(a[None]).logits[0], model(b[None]).logits[0]])
        explicit = model(packed, seq_idx=torch.tensor([[0] * 11 + [1] * 14])).logits[0]
        leaked = model(packed).logits[0]  # without packing info the second sequence sees the first
    assert (out - sep).abs().max() <= 1e-4
    assert (explicit - sep).abs().max() <= 1e-4
    assert (leaked[11:] - sep[11:]).abs().max() > 1e-3


def test_packed_loss_equals_unpacked_loss():
    model = Nemotron3ForCausalLM(tiny_config("all_blocks"))
    a, b = torch.randint(3, 96, (9,)), torch.randint(3, 96, (12,))
    packed = torch.cat([a, b])[None]
    labels = packed.clone()
    labels[0, 9] = -100  # the first token of the second sequence has no predecessor
    pos = torch.cat([torch.arange(9), torch.arange(12)])[None]
    loss_packed = model(packed, position_ids=pos, labels=labels).loss
    la = model(a[None], labels=a[None]).loss
    lb = model(b[None], labels=b[None]).loss
    unpacked = (la * 8 + lb * 11) / 19
    assert abs(loss_packed.item() - unpacked.item()) < 1e-5
