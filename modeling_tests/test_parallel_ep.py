"""Expert parallelism on 2 and 4 gloo CPU processes equals one process (loss, every gathered gradient),
token dropping equals a loop-based single-process reference of the same policy, and EP checkpoints
round-trip bit-exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.modeling.moe import LocalDispatcher
from transformers_nemotron3.parallel.config import Nemotron3ParallelConfig
from transformers_nemotron3.parallel.dispatcher import AllToAllDispatcher, capacity_keep_mask
from transformers_nemotron3.parallel.expert_parallel import apply_expert_parallel, is_expert_shard, moe_layers
from transformers_nemotron3.parallel.gradients import mean_over_ranks, reduce_gradients
from transformers_nemotron3.parallel.spawn import run_processes

try:
    from tiny_configs import tiny_config
except ImportError:  # pragma: no cover - when imported as a package module
    from modeling_tests.tiny_configs import tiny_config

TOL = 1e-5
SCENARIOS = {
    "nano": ("all_blocks", {}),  # M*E-ME with a shared expert
    "latent": ("latent_groups_mtp", {}),  # LatentMoE + group routing + MTP (its MoE is EP too)
}


# ---------------------------------------------------------------------------------------- reference
def reference_keep(topk_idx, weights, num_experts, capacity, policy):
    """Loop-based capacity dropping: per expert, rank its copies by policy, keep the first ``capacity``."""
    t, k = topk_idx.shape
    keep = torch.zeros(t, k, dtype=torch.bool)
    for e in range(num_experts):
        cands = [(i, j) for i in range(t) for j in range(k) if int(topk_idx[i, j]) == e]
        if policy == "probs":
            cands.sort(key=lambda c: (-float(weights[c]), c[0] * k + c[1]))
        for i, j in cands[:capacity]:
            keep[i, j] = True
    return keep


class ReferenceDropDispatcher(LocalDispatcher):
    """Single-process dropping reference: every copy is computed, dropped ones weigh (and learn) nothing."""

    def __init__(self, capacity_factor, policy):
        self.cf, self.policy, self.last_keep = capacity_factor, policy, None

    def dispatch(self, x, topk_idx, topk_weights, num_experts):
        t, k = topk_idx.shape
        cap = math.ceil(t * k / num_experts * self.cf)
        self.last_keep = reference_keep(topk_idx, topk_weights.detach(), num_experts, cap, self.policy)
        rows, counts, ctx = super().dispatch(x, topk_idx, topk_weights, num_experts)
        return rows, counts, (ctx, self.last_keep)

    def combine(self, out, weights, ctx, num_tokens):
        ctx, keep = ctx
        return super().combine(out, weights * keep.to(weights.dtype), ctx, num_tokens)


def _install_reference(model, cf, policy):
    for moe in moe_layers(model):
        moe.dispatcher = ReferenceDropDispatcher(cf, policy)


def _batch(world, vocab, per_rank=2, length=12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (world * per_rank, length), generator=g)


def _model(name, overrides):
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config(name, **overrides)).float()
    model.train()
    return model


def _reference(model, ids, world, cf=None, policy="probs"):
    """Single process: mean over the rank slices of the loss (slices are equal-sized), gradients likewise."""
    ref = copy.deepcopy(model)
    if cf is not None:
        _install_reference(ref, cf, policy)
    per = ids.shape[0] // world
    total = 0.0
    keeps = []
    for r in range(world):
        local = ids[r * per:(r + 1) * per]
        loss = ref(local, labels=local).loss / world
        loss.backward()
        total += float(loss)
        if cf is not None:
            keeps.append(moe_layers(ref)[0].dispatcher.last_keep.clone())
    return total, {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}, keeps


def _ep_run(rank, world, ep, name, overrides, cf=None, policy="probs", pad=False):
    pcfg = Nemotron3ParallelConfig(expert_parallel_size=ep, capacity_factor=cf, drop_policy=policy,
                                   pad_to_capacity=pad).validate()
    _, expert_mesh = pcfg.build_meshes()
    model = _model(name, overrides)
    ids = _batch(world, model.config.vocab_size)
    box = [_reference(model, ids, world, cf, policy) if rank == 0 else None]  # computed once, then shared
    dist.broadcast_object_list(box, src=0)
    ref_loss, ref_grads, ref_keeps = box[0]
    apply_expert_parallel(model, expert_mesh, cf, policy, pad)
    per = ids.shape[0] // world
    local = ids[rank * per:(rank + 1) * per]
    loss = model(local, labels=local).loss
    loss.backward()
    keep = moe_layers(model)[0].dispatcher.last_keep
    reduce_gradients(model)  # dense; the expert DTensors reduced themselves over edp in their grad hooks
    loss = float(mean_over_ranks(loss))
    worst, worst_name = 0.0, None
    for n, p in model.named_parameters():
        assert is_expert_shard(p) == isinstance(p.grad, DTensor), n
        g = p.grad.full_tensor() if is_expert_shard(p) else p.grad
        diff = float((g - ref_grads[n]).abs().max())
        if diff > worst:
            worst, worst_name = diff, n
    out = {"loss_diff": abs(loss - ref_loss), "grad_diff": worst, "worst": worst_name,
           "n_grads": len(ref_grads), "sharded": sum(is_expert_shard(p) for p in model.parameters())}
    if cf is not None:
        out["keep_equal"] = bool(torch.equal(keep, ref_keeps[rank]))
        out["dropped"] = int((~keep).sum())
    return out


def _checkpoint_roundtrip(rank, world, ep, folder):
    """EP=ep run -> full official checkpoint -> one process (bit-exact) -> back into shards (bit-exact)."""
    from transformers_nemotron3.parallel.checkpoint import (
        gather_full_state_dict, load_full_checkpoint_into, save_full_checkpoint,
    )

    _, expert_mesh = Nemotron3ParallelConfig(expert_parallel_size=ep).build_meshes()
    model = apply_expert_parallel(_model("latent_groups_mtp", {}), expert_mesh)
    with torch.no_grad():  # move away from the seed-0 init (same noise on every rank: dense stays replicated)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_full_checkpoint(model, f"{folder}/ep")
    gathered = gather_full_state_dict(model)
    single = Nemotron3ForCausalLM.from_pretrained(f"{folder}/ep", dtype=torch.float32)
    loaded_equal = all(torch.equal(v, gathered[k]) for k, v in single.state_dict().items())
    files = sorted(__import__("os").listdir(f"{folder}/ep"))
    with torch.no_grad():
        for p in single.parameters():
            p.mul_(1.5)
    if rank == 0:
        single.save_pretrained(f"{folder}/single")
    dist.barrier()
    fresh = apply_expert_parallel(_model("latent_groups_mtp", {}), expert_mesh)
    load_full_checkpoint_into(fresh, f"{folder}/single")
    back_equal = all(torch.equal(v, single.state_dict()[k]) for k, v in gather_full_state_dict(fresh).items())
    return {"loaded_equal": loaded_equal, "back_equal": back_equal, "files": files,
            "n_keys": len(gathered), "sharded": sum(is_expert_shard(p) for p in fresh.parameters())}


def _accumulation_run(rank, world, ep):
    """Accelerate's gradient accumulation (2 micro-batches): the expert shards reduce once, at the synced
    micro-batch, and the accumulated gradients equal one process on the whole batch."""
    from accelerate import Accelerator

    from transformers_nemotron3.parallel import prepare_nemotron3_parallel

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model("all_blocks", {})
    ids = _batch(2 * world, model.config.vocab_size)  # 2 micro-batches of 2 rows per rank
    box = [_reference(model, ids, 2 * world)[:2] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    _, ref_grads = box[0]
    par = prepare_nemotron3_parallel(model, Nemotron3ParallelConfig(expert_parallel_size=ep))
    ddp_model = accelerator.prepare(par.model)
    synced = []
    for micro in range(2):
        # rank r's slices are r and r + world of the 2*world reference slices (the reference's mean is order-free)
        local = ids[(micro * world + rank) * 2:(micro * world + rank) * 2 + 2]
        with accelerator.accumulate(ddp_model):
            accelerator.backward(ddp_model(local, labels=local).loss)
            synced.append(accelerator.sync_gradients)
    worst = max(float(((p.grad.full_tensor() if is_expert_shard(p) else p.grad) - ref_grads[n]).abs().max())
                for n, p in par.base.named_parameters())
    return {"grad_diff": worst, "synced": synced}


def _many(rank, world, ep, jobs, folder=None):
    out = {key: _ep_run(rank, world, ep, *job) for key, job in jobs.items()}
    if folder is not None:
        out["checkpoint"] = _checkpoint_roundtrip(rank, world, ep, folder)
        out["accumulation"] = _accumulation_run(rank, world, ep)
    return out


def _check(results):
    for rank_out in results:
        acc = rank_out.pop("accumulation", None)
        if acc is not None:
            assert acc["synced"] == [False, True] and acc["grad_diff"] < TOL, acc
        ckpt = rank_out.pop("checkpoint", None)
        if ckpt is not None:
            assert ckpt["loaded_equal"] and ckpt["back_equal"] and ckpt["sharded"] > 0, ckpt
            assert "config.json" in ckpt["files"] and any(f.endswith(".safetensors") for f in ckpt["files"]), ckpt
        for key, r in rank_out.items():
            assert r["loss_diff"] < TOL, (key, r)
            assert r["grad_diff"] < TOL, (key, r)
            assert r["sharded"] > 0, (key, r)
            if "keep_equal" in r:
                assert r["keep_equal"], (key, r)


# ---------------------------------------------------------------------------------------- tests
def test_ep2_dropless_dropping_and_checkpoint(tmp_path):
    jobs = {k: (name, ov) for k, (name, ov) in SCENARIOS.items()}
    jobs["drop-probs"] = ("all_blocks", {}, 1.0, "probs", False)
    jobs["drop-position-padded"] = ("all_blocks", {}, 1.0, "position", True)
    jobs["drop-latent-probs"] = ("latent_groups_mtp", {}, 1.0, "probs", False)
    results = run_processes(_many, 2, (2, jobs, str(tmp_path)), timeout=200)
    _check(results)
    assert any(r["dropped"] > 0 for out in results for k, r in out.items() if k.startswith("drop")), \
        "capacity factor 1.0 dropped nothing: the test would not exercise dropping"


def test_ep4_equals_single_process():
    jobs = {k: (name, ov) for k, (name, ov) in SCENARIOS.items()}
    _check(run_processes(_many, 4, (4, jobs), timeout=150))


def test_capacity_mask_matches_loop_reference_and_dropless_is_infinite_capacity():
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])
    w = torch.rand(40, 2, generator=g)
    for policy in ("probs", "position"):
        for cap in (1, 3, 10):
            assert torch.equal(capacity_keep_mask(idx, w, 8, cap, policy), reference_keep(idx, w, 8, cap, policy))
    # dropless dispatcher == capacity so large nothing is dropped
    x = torch.randn(40, 5)
    a, b = AllToAllDispatcher(), AllToAllDispatcher(capacity_factor=1e6)
    ra, ca, ctxa = a.dispatch(x, idx, w, 8)
    rb, cb, ctxb = b.dispatch(x, idx, w, 8)
    assert torch.equal(ra, rb) and torch.equal(ca, cb)
    assert torch.equal(a.combine(ra * 2, w, ctxa, 40), b.combine(rb * 2, w, ctxb, 40))
    # the routing weights arrive through dispatch(); dropping by weight without them is a clear error
    with pytest.raises(ValueError, match="topk_weights"):
        AllToAllDispatcher(capacity_factor=1.0).dispatch(x, idx, None, 8)
    kept = AllToAllDispatcher(capacity_factor=1.0, drop_policy="probs")
    kept.dispatch(x, idx, w, 8)
    assert torch.equal(kept.last_keep, reference_keep(idx, w, 8, math.ceil(40 * 2 / 8), "probs"))
    with pytest.raises(ValueError, match="DeviceMesh"):
        apply_expert_parallel(_model("all_blocks", {}), expert_mesh=object())


def test_parallel_config_errors():
    with pytest.raises(ValueError, match="context_parallel_size=3"):
        Nemotron3ParallelConfig(context_parallel_size=3, world_size=4).validate()
    with pytest.raises(ValueError, match="n_routed_experts=8"):
        Nemotron3ParallelConfig(expert_parallel_size=3, world_size=3).validate(tiny_config("all_blocks"))
    with pytest.raises(ValueError, match="no MoE"):
        Nemotron3ParallelConfig(expert_parallel_size=2, world_size=2).validate(tiny_config("dense"))
    with pytest.raises(ValueError, match="drop_policy"):
        Nemotron3ParallelConfig(drop_policy="random", world_size=1).validate()
    with pytest.raises(ValueError, match="pad_to_capacity"):
        Nemotron3ParallelConfig(pad_to_capacity=True, world_size=1).validate()
    with pytest.raises(ValueError, match="n_groups=2"):
        Nemotron3ParallelConfig(context_parallel_size=4, world_size=4).validate(tiny_config("all_blocks", mamba_num_heads=8))
    c = Nemotron3ParallelConfig(context_parallel_size=2, expert_parallel_size=4, world_size=8).validate()
    assert (c.dp, c.cp, c.edp, c.ep) == (4, 2, 2, 4)
