"""Context parallelism (zig-zag, attention K/V all-gather, head-parallel Mamba) on gloo CPU processes equals
one process: loss and every gradient, on the M*E-ME config, lengths that are not multiples of the SSD
chunk size (20, and 19 which also needs right padding), packed sequences; and CP=2 x EP=2 folded on 4."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.parallel.config import Nemotron3ParallelConfig
from transformers_nemotron3.parallel.context_parallel import ContextParallelLM, apply_context_parallel, zigzag_positions
from transformers_nemotron3.parallel.expert_parallel import apply_expert_parallel, is_expert_shard
from transformers_nemotron3.parallel.gradients import reduce_gradients
from transformers_nemotron3.parallel.spawn import run_processes

try:
    from tiny_configs import tiny_config
except ImportError:  # pragma: no cover
    from modeling_tests.tiny_configs import tiny_config

TOL = 1e-5


def _inputs(n_seq, length, vocab, packed):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (n_seq, length), generator=g)
    pos = torch.arange(length)[None].repeat(n_seq, 1)
    if packed:  # two documents per row, split at 7
        pos[:, 7:] = torch.arange(length - 7)
    return ids, pos


def _cp_run(rank, world, cp, ep, length, packed):
    pcfg = Nemotron3ParallelConfig(context_parallel_size=cp, expert_parallel_size=ep).validate()
    dense, expert = pcfg.build_meshes()
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).float().train()
    dp = pcfg.dp
    ids, pos = _inputs(2 * dp, length, model.config.vocab_size, packed)
    ref = copy.deepcopy(model)
    ref_loss = 0.0
    for d in range(dp):  # single process: mean of the dp slices' losses
        sl = slice(2 * d, 2 * d + 2)
        loss = ref(ids[sl], labels=ids[sl], position_ids=pos[sl]).loss / dp
        loss.backward()
        ref_loss += float(loss)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    if ep > 1:
        apply_expert_parallel(model, expert["ep"].get_group())
    state = apply_context_parallel(model, dense["cp"].get_group())
    wrapped = ContextParallelLM(model, state)
    d = dense.get_coordinate()[0]
    sl = slice(2 * d, 2 * d + 2)
    out = wrapped(ids[sl], labels=ids[sl], position_ids=pos[sl])
    out.loss.backward()
    reduce_gradients(model, expert["edp"].get_group())
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    worst, name = 0.0, None
    for n, p in model.named_parameters():
        g = p.grad
        if is_expert_shard(p):
            parts = [torch.empty_like(g) for _ in range(ep)]
            dist.all_gather(parts, g.contiguous(), group=expert["ep"].get_group())
            g = torch.cat(parts)
        diff = float((g - ref_grads[n]).abs().max())
        if diff > worst:
            worst, name = diff, n
    return {"loss_diff": abs(float(loss) / world - ref_loss), "grad_diff": worst, "worst": name,
            "local_tokens": out.logits.shape[1]}


def _many(rank, world, cp, ep, jobs):
    return {key: _cp_run(rank, world, cp, ep, *job) for key, job in jobs.items()}


def _check(results):
    for out in results:
        for key, r in out.items():
            assert r["loss_diff"] < TOL and r["grad_diff"] < TOL, (key, r)


def test_zigzag_positions():
    assert zigzag_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert sorted(torch.cat([zigzag_positions(24, 3, r) for r in range(3)]).tolist()) == list(range(24))


def test_cp2_attention_and_mamba_equal_single_process():
    jobs = {"len20": (20, False), "len19_packed_padded": (19, True)}
    results = run_processes(_many, 2, (2, 1, jobs), timeout=150)
    _check(results)
    assert results[0]["len20"]["local_tokens"] == 10


def test_cp2_x_ep2_folded_on_4_processes():
    _check(run_processes(_many, 4, (2, 2, {"len20_packed": (20, True)}), timeout=150))
