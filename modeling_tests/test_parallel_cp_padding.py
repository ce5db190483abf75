"""Padding tokens never reach the router's statistics, the aux loss or the aux-loss-free bias update.

Two oracles:

- one process, unpadded rows: a right-padded batch (with its ``attention_mask``) must give the same per-expert
  token counts (``Nemotron3Router.expert_load``) and the same sequence-level aux loss as the same rows run
  one by one without padding;
- one process, several optimizer steps: CP=2 x EP=2 folded on 4 gloo processes, packed rows of 23 tokens
  (`ContextParallelLM` right-pads them to 24 = a multiple of 2*cp), aux-loss-free bias updates on, must end
  with the same weights and ``e_score_correction_bias`` as one process training on the unpadded rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.modeling.moe import Nemotron3Router
from transformers_nemotron3.parallel.accelerate_plugin import prepare_nemotron3_parallel
from transformers_nemotron3.parallel.config import Nemotron3ParallelConfig
from transformers_nemotron3.parallel.expert_parallel import is_expert_shard
from transformers_nemotron3.parallel.spawn import run_processes

try:
    from tiny_configs import tiny_config
except ImportError:  # pragma: no cover
    from modeling_tests.tiny_configs import tiny_config

TOL = 1e-5
LR = 0.05
BIAS_RATE = 1e-2


def _loads(model) -> list[torch.Tensor]:
    """Each router's counted loads (then reset, as the bias update does)."""
    out = []
    for m in model.modules():
        if isinstance(m, Nemotron3Router) and m.expert_load is not None:  # (the MTP head runs only with labels)
            out.append(m.expert_load.clone())
            m.expert_load = None
    return out


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp"])
def test_right_padded_batch_gives_unpadded_router_statistics(name):
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config(name, moe_aux_loss_coef=0.01)).float().train()
    lengths = [13, 9, 11]
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1

    padded = model(ids, attention_mask=mask)
    padded_loads = _loads(model)
    singles, per_row = [], []
    for r in rows:  # the oracle: each row alone, unpadded
        singles.append(model(r[None]))
        per_row.append(_loads(model))
    unpadded_loads = [torch.stack(layer).sum(0) for layer in zip(*per_row)]

    assert sum(float(x.sum()) for x in padded_loads) == sum(lengths) * model.config.num_experts_per_tok * len(
        padded_loads), "padding tokens were counted"
    for p, u in zip(padded_loads, unpadded_loads):
        assert torch.equal(p, u), (p, u)
    unpadded_aux = torch.stack([s.aux_loss for s in singles]).mean()
    assert abs(float(padded.aux_loss) - float(unpadded_aux)) < 1e-6, (float(padded.aux_loss), float(unpadded_aux))


def _packed_inputs(n_rows: int, length: int, vocab: int):
    """Rows of three packed documents (7, 9 and the rest tokens), ``length`` odd so CP must pad."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (n_rows, length), generator=g)
    pos = torch.arange(length)[None].repeat(n_rows, 1)
    pos[:, 7:16] = torch.arange(9)
    pos[:, 16:] = torch.arange(length - 16)
    return ids, pos


def _state(model) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    return out


def _reference(model, ids, pos, dp: int, steps: int) -> dict[str, torch.Tensor]:
    """One process, unpadded rows: the mean of the dp slices' losses, SGD, bias update after each step."""
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    rows = ids.shape[0] // dp
    for _ in range(steps):
        for d in range(dp):
            sl = slice(d * rows, (d + 1) * rows)
            (ref(ids[sl], labels=ids[sl], position_ids=pos[sl]).loss / dp).backward()
        opt.step()
        opt.zero_grad()
        ref.update_expert_bias()
    return _state(ref)


def _cp_ep_steps(rank, world, cp, ep, length, steps):
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks", moe_bias_update_rate=BIAS_RATE)).float().train()
    dp = world // cp
    ids, pos = _packed_inputs(2 * dp, length, model.config.vocab_size)
    expected = _reference(model, ids, pos, dp, steps)
    par = prepare_nemotron3_parallel(model, Nemotron3ParallelConfig(context_parallel_size=cp,
                                                                    expert_parallel_size=ep))
    opt = torch.optim.SGD(par.base.parameters(), lr=LR)
    local_tokens = None
    for _ in range(steps):
        out = par.model(**par.shard_batch({"input_ids": ids, "position_ids": pos}))
        local_tokens = out.logits.shape[1]
        out.loss.backward()
        par.reduce_gradients()
        opt.step()
        opt.zero_grad()
        par.sync_expert_load()
        par.base.update_expert_bias()
    worst = {"weights": (0.0, None), "bias": (0.0, None)}
    for n, t in _state(par.base).items():
        param = dict(par.base.named_parameters()).get(n)
        if param is not None and is_expert_shard(param):
            t = t.full_tensor()
        kind = "bias" if n.endswith("e_score_correction_bias") else "weights"
        diff = float((t - expected[n]).abs().max())
        if diff > worst[kind][0]:
            worst[kind] = (diff, n)
    bias_moved = max(float(v.abs().max()) for n, v in expected.items() if n.endswith("e_score_correction_bias"))
    return {"worst": worst, "local_tokens": local_tokens, "bias_moved": bias_moved}


def test_cp2_x_ep2_padded_packed_rows_bias_updates_equal_single_process():
    length, steps = 23, 3
    results = run_processes(_cp_ep_steps, 4, (2, 2, length, steps), timeout=300)
    for r in results:
        assert r["local_tokens"] == 12  # 23 tokens padded to 24, split over cp=2: padding is really in play
        assert r["bias_moved"] >= BIAS_RATE  # the bias update ran in the reference
        for kind, (diff, name) in r["worst"].items():
            assert diff < TOL, (kind, diff, name)
