"""DGS trains a tiny Nemotron3ForCausalLM: 1 server + 2 workers on gloo, checkpoint loads back."""

from __future__ import annotations

import pytest
import torch

from tiny_configs import tiny_config
from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.dgs import DGSConfig, launch_local, load_checkpoint, train_nemotron3_dgs

pytestmark = pytest.mark.timeout(120)


def _model() -> Nemotron3ForCausalLM:
    torch.manual_seed(0)
    return Nemotron3ForCausalLM(tiny_config("all_blocks")).float()


def _tokens(seed: int, n: int) -> torch.Tensor:
    """A learnable stream: each sequence counts up from a random start (mod the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, 96, (n, 1), generator=g)
    return 3 + (start + torch.arange(16)) % 93


def _lm_loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _run(rank: int, world: int, config: DGSConfig):
    model = _model()
    batches = _tokens(100 + rank, 4 * 200).split(4)
    result = train_nemotron3_dgs(model, batches, config)
    return result.server if result.role == "server" else result.worker


def test_dgs_trains_tiny_nemotron_and_checkpoint_loads(tmp_path):
    path = str(tmp_path / "nemotron_dgs.pt")
    config = DGSConfig(ratio=0.01, lr=0.2, momentum=0.7, total_updates=60, checkpoint_path=path, progress=False)
    out = launch_local(_run, 3, args=(config,), timeout=90)
    server = out[0]
    assert server.updates == 60 and set(server.worker_status.values()) == {"stopped"}
    assert server.bytes_up_per_update * 30 < 4 * sum(p.numel() for p in _model().parameters())
    model = _model()
    load_checkpoint(path, model)
    held_out = _tokens(7, 32)
    before, after = _lm_loss(_model(), held_out), _lm_loss(model, held_out)
    assert after < before - 0.1, (before, after)
