"""Context parallelism (zig-zag, attention K/V all-gather, head-parallel Mamba) on gloo CPU processes equals
one process: loss and every gradient, on the M*E-ME config, lengths that are not multiples of the SSD
chunk size (20, and 19 which also needs right padding), packed sequences; and CP=2 x EP=2 folded on 4
(with replicated data parallelism and with FSDP2 for the dense part). Runs through
`prepare_nemotron3_parallel`, i.e. the same path as the Accelerate example."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.parallel.config import Nemotron3ParallelConfig
from transformers_nemotron3.parallel.accelerate_plugin import prepare_nemotron3_parallel
from transformers_nemotron3.parallel.context_parallel import zigzag_positions
from transformers_nemotron3.parallel.expert_parallel import is_expert_shard
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


def _reference_grads(model, ids, pos, dp):
    """Single process on rank 0 only (mean of the dp slices' losses), broadcast to the other ranks."""
    names = [n for n, _ in model.named_parameters()]
    flat = torch.zeros(sum(p.numel() for p in model.parameters()) + 1)
    if dist.get_rank() == 0:
        ref = copy.deepcopy(model)
        total = 0.0
        for d in range(dp):
            sl = slice(2 * d, 2 * d + 2)
            loss = ref(ids[sl], labels=ids[sl], position_ids=pos[sl]).loss / dp
            loss.backward()
            total += float(loss.detach())
        flat = torch.cat([p.grad.reshape(-1) for p in ref.parameters()] + [torch.tensor([total])])
    dist.broadcast(flat, 0)
    grads, offset = {}, 0
    for n, p in zip(names, model.parameters()):
        grads[n] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return float(flat[-1]), grads


def _cp_run(rank, world, cp, ep, length, packed, mode="replicate", overrides=None):
    """Through the Accelerate plugin: EP, CP and (mode='shard') FSDP2, then the plugin's own reductions."""
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks", **(overrides or {}))).float().train()
    pcfg = Nemotron3ParallelConfig(context_parallel_size=cp, expert_parallel_size=ep, data_parallel_mode=mode)
    dp = world // cp
    ids, pos = _inputs(2 * dp, length, model.config.vocab_size, packed)
    ref_loss, ref_grads = _reference_grads(model, ids, pos, dp)
    par = prepare_nemotron3_parallel(model, pcfg)
    out = par.model(**par.shard_batch({"input_ids": ids, "position_ids": pos}))
    out.loss.backward()
    par.reduce_gradients()
    loss = par.mean_loss(out.loss)
    worst, name = 0.0, None
    sharded, expert_rows = 0, set()
    for n, p in par.base.named_parameters():
        sharded += is_expert_shard(p)
        if is_expert_shard(p):
            expert_rows.add(p.to_local().shape[0])  # experts held here: E/ep, or E/(ep*edp) under FSDP2
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad  # expert shards and FSDP2 shards
        n = n.replace("_fsdp_wrapped_module.", "")
        diff = float((g - ref_grads[n]).abs().max())
        if diff > worst:
            worst, name = diff, n
    return {"loss_diff": abs(loss - ref_loss), "grad_diff": worst, "worst": name,
            "local_tokens": out.logits.shape[1], "sharded": sharded, "ep": ep,
            "expert_rows": sorted(expert_rows), "mode": mode}


def _many(rank, world, cp, ep, jobs):
    return {key: _cp_run(rank, world, cp, ep, *job) for key, job in jobs.items()}


def _check(results):
    for out in results:
        for key, r in out.items():
            assert r["loss_diff"] < TOL and r["grad_diff"] < TOL, (key, r)
            assert (r["sharded"] > 0) == (r["ep"] > 1), (key, r)  # expert shards are DTensors exactly under EP


def test_zigzag_positions():
    assert zigzag_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert sorted(torch.cat([zigzag_positions(24, 3, r) for r in range(3)]).tolist()) == list(range(24))


def test_cp2_attention_and_mamba_equal_single_process():
    jobs = {"len20": (20, False), "len19_packed_padded": (19, True),
            "len20_rope_qknorm": (20, True, "replicate", {"use_rope": True, "attention_qk_norm": True})}
    results = run_processes(_many, 2, (2, 1, jobs), timeout=150)
    _check(results)
    assert results[0]["len20"]["local_tokens"] == 10


def test_cp2_x_ep2_folded_on_4_processes():
    jobs = {"len20_packed": (20, True), "len20_packed_fsdp2": (20, True, "shard")}
    results = run_processes(_many, 4, (2, 2, jobs), timeout=240)
    _check(results)
    experts = tiny_config("all_blocks").n_routed_experts
    assert results[0]["len20_packed"]["expert_rows"] == [experts // 2]  # ep=2; replicated over edp
    assert results[0]["len20_packed_fsdp2"]["expert_rows"] == [experts // 4]  # ep=2, then FSDP2 over edp=2


def _cp_eval(rank, world, cp, ep, length, packed):
    """Evaluation under CP: eval mode, no autograd; the loss equals one process's on the same rows."""
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).float().train()
    pcfg = Nemotron3ParallelConfig(context_parallel_size=cp, expert_parallel_size=ep)
    dp = world // cp
    ids, pos = _inputs(2 * dp, length, model.config.vocab_size, packed)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()
        ref_loss = sum(float(ref(ids[2 * d:2 * d + 2], labels=ids[2 * d:2 * d + 2], position_ids=pos[2 * d:2 * d + 2]).loss)
                       for d in range(dp)) / dp
    par = prepare_nemotron3_parallel(model, pcfg)
    par.model.eval()
    with torch.no_grad():
        out = par.model(**par.shard_batch({"input_ids": ids, "position_ids": pos}))
        loss = par.mean_loss(out.loss)
    loads = [m.gate.expert_load for m in par.base.modules() if hasattr(m, "gate") and hasattr(m.gate, "expert_load")]
    return {"loss_diff": abs(loss - ref_loss), "training": par.base.training, "loads": [x is None for x in loads]}


def test_cp2_x_ep2_evaluation_equals_single_process():
    """Evaluation (model.eval(), no_grad) under CP=2 x EP=2 on 4 processes, packed rows needing right padding:
    the loss equals one process's, and evaluation counts no router load (no bias update follows from it)."""
    results = run_processes(_cp_eval, 4, (2, 2, 19, True), timeout=240)
    for r in results:
        assert r["loss_diff"] < TOL and not r["training"], r
        assert r["loads"] and all(r["loads"]), r
