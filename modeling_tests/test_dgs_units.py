"""DGS pieces in one process: top-k selection, wire format, SAMomentum, config checks, checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from transformers_nemotron3.dgs import (
    DGSConfig, FlatLayout, SAMomentum, StepDecay, WarmupCosine, decode_sparse, encode_sparse, layer_k,
    load_checkpoint, payload_bytes, save_checkpoint, select_topk, topk_count,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 3))


def test_select_topk_takes_the_largest_entries_of_every_layer():
    layout = FlatLayout.from_module(_model())
    assert layout.numels == (1000, 50, 150, 3)
    flat = torch.randn(layout.numel)
    idx = select_topk(flat, layout, 0.01)
    assert idx.numel() == topk_count(layout, 0.01) == 10 + 1 + 2 + 1
    for offset, n in zip(layout.offsets, layout.numels):  # oracle: sort each layer
        mine = sorted(i for i in idx.tolist() if offset <= i < offset + n)
        expected = sorted((torch.argsort(flat[offset:offset + n].abs(), descending=True)[:layer_k(n, 0.01)] + offset).tolist())
        assert mine == expected


def test_wire_format_round_trips_and_counts_8_bytes_per_entry():
    idx = torch.tensor([0, 7, 123456, 3])
    vals = torch.tensor([1.5, -2.25, float("1e-30"), 3.0e30])
    wire = encode_sparse(idx, vals)
    assert wire.dtype == torch.int32 and wire.numel() * wire.element_size() == 8 * 4
    back_idx, back_vals = decode_sparse(wire)
    assert torch.equal(back_idx, idx) and torch.equal(back_vals, vals)
    layout = FlatLayout.from_module(_model())
    assert payload_bytes(layout, 1.0) == 4 * layout.numel
    assert payload_bytes(layout, 0.01) == 8 * 14


def test_samomentum_dense_is_heavy_ball_momentum_bit_for_bit():
    layout = FlatLayout.from_module(_model())
    sam = SAMomentum(layout, momentum=0.9, ratio=1.0)
    u = torch.zeros(layout.numel)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(layout.numel, generator=g)
        idx, sent = sam.step(grad, lr=0.1)
        u = 0.9 * u + 0.1 * grad
        assert idx is None and torch.equal(sent, u)


def test_samomentum_divides_unsent_entries_by_momentum():
    layout = FlatLayout.from_module(_model())
    m, lr = 0.5, 0.1
    sam = SAMomentum(layout, momentum=m, ratio=0.01)
    grad = torch.randn(layout.numel)
    idx, sent = sam.step(grad, lr)
    a = lr * grad
    assert torch.equal(sent, a[idx])
    unsent = torch.ones(layout.numel, dtype=torch.bool)
    unsent[idx] = False
    torch.testing.assert_close(sam.velocity[unsent], a[unsent] / m)
    assert torch.equal(sam.velocity[idx], a[idx])  # sent entries are kept, not zeroed


def test_samomentum_entry_waiting_t_steps_keeps_one_momentum_decay():
    """Eq. 16: unsent for T-1 steps, sent at step T -> u = m*u_c + lr * sum of the T gradients."""
    layout = FlatLayout.from_module(nn.Linear(100, 1, bias=False))
    m, lr = 0.7, 0.2
    sam = SAMomentum(layout, momentum=m, ratio=0.01)  # one entry per step
    grads = []
    for t in range(4):
        grad = torch.zeros(100)
        grad[0] = 1.0 + t  # the watched coordinate: small, never the largest ...
        grad[1 + t] = 100.0  # ... because a fresh big coordinate wins each step
        if t == 3:
            grad[0] = 1000.0  # now it wins
        grads.append(grad[0].item())
        if t == 0:
            sam.velocity[0] = 2.0  # u_c, a velocity carried from before
        idx, sent = sam.step(grad, lr)
        assert (0 in idx.tolist()) == (t == 3)
    expected = m * 2.0 + lr * sum(grads)
    assert sent.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(ratio=0.0), "ratio=0.0"), (dict(ratio=1.5), "ratio=1.5"), (dict(down_ratio=0), "down_ratio=0"),
    (dict(momentum=1.0), "momentum=1.0"), (dict(momentum=0.0), "momentum=0.0"), (dict(mode="gossip"), "gossip"),
    (dict(total_updates=0), "total_updates=0"), (dict(lr=-1.0), "lr=-1.0"),
    (dict(checkpoint_every=10), "checkpoint_path"), (dict(worker_timeout=0), "worker_timeout=0"),
])
def test_bad_config_raises_value_error_naming_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        DGSConfig(**kwargs)


def test_non_float32_model_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="model.float"):
        FlatLayout.from_module(nn.Linear(3, 3).to(torch.bfloat16))


def test_lr_schedule_is_applied_by_server_step():
    cfg = DGSConfig(lr=0.1, lr_lambda=StepDecay((10, 20), 0.1))
    assert [cfg.lr_at(s) for s in (0, 10, 25)] == pytest.approx([0.1, 0.01, 0.001])
    cos = WarmupCosine(total=100, warmup=10)
    assert cos(0) == pytest.approx(0.1) and cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lr_lambda"):
        DGSConfig(lr_lambda=lambda s: float("nan")).lr_at(3)


def test_checkpoint_is_atomic_and_loads_strictly(tmp_path):
    model = _model()
    path = str(tmp_path / "sub" / "ckpt.pt")
    save_checkpoint(path, model, 7, {"ratio": 0.01}, {1: "done"})
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]
    fresh = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 3))
    blob = load_checkpoint(path, fresh)
    assert blob["step"] == 7 and blob["workers"] == {1: "done"}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DGS checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
