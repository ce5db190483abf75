"""Bytes sent per step per rank by the EP all-to-all, and tokens/s, for ep/cp settings on gloo CPU processes.

    OMP_NUM_THREADS=1 python scripts/bench_parallel.py --out bench_parallel.json

For each setting a fresh group of processes trains a small Nemotron 3 (pattern M*EME, 16 experts, top-4)
for a few steps. "a2a_bytes_per_step" counts the token rows this rank sends to *other* ep ranks in the
forward dispatch + combine of every MoE layer, times 2 for the backward (which moves the same rows
back); LatentMoE runs route latent-width rows, so the ratio to the same run without a latent
projection should be about hidden/latent. Timing on a shared 2-core CPU box is indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from transformers_nemotron3.parallel.spawn import run_processes

HIDDEN, LATENT = 256, 64


def model_config(latent):
    from transformers_nemotron3 import Nemotron3Config

    return Nemotron3Config(vocab_size=512, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=64, mamba_num_heads=8, mamba_head_dim=32, n_groups=2, ssm_state_size=16,
                           conv_kernel=4, chunk_size=32, n_routed_experts=16, num_experts_per_tok=4,
                           moe_intermediate_size=128, moe_shared_expert_intermediate_size=256,
                           intermediate_size=256, hybrid_override_pattern="M*EME", moe_latent_size=latent,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _worker(rank, world, ep, cp, latent, rows, length, steps):
    import torch.distributed as dist

    from transformers_nemotron3 import Nemotron3ForCausalLM
    from transformers_nemotron3.parallel import Nemotron3ParallelConfig, prepare_nemotron3_parallel

    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(model_config(latent)).float().train()
    par = prepare_nemotron3_parallel(model, Nemotron3ParallelConfig(context_parallel_size=cp,
                                                                     expert_parallel_size=ep))
    opt = torch.optim.SGD(par.model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (rows * par.config.dp, length), generator=g)
    times, sent = [], []
    for step in range(steps + 1):
        batch = par.shard_batch({"input_ids": ids})
        dist.barrier()
        t0 = time.perf_counter()
        out = par.model(**batch)
        out.loss.backward()
        par.reduce_gradients()
        opt.step()
        opt.zero_grad()
        dist.barrier()
        times.append(time.perf_counter() - t0)
        sent.append(2 * par.dispatch_bytes(reset=True))  # forward rows + the same rows in backward
    times, sent = times[1:], sent[1:]  # first step is warm-up
    local_tokens = rows * length // cp
    return {"a2a_bytes_per_step": sum(sent) / len(sent), "step_s": sum(times) / len(times),
            "tokens_per_s_per_rank": local_tokens / (sum(times) / len(times))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_parallel.json")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    settings = [  # (world, ep, cp, latent)
        (2, 1, 1, None), (2, 2, 1, None), (2, 2, 1, LATENT), (2, 1, 2, None), (2, 2, 2, None), (2, 2, 2, LATENT),
    ]
    results = []
    for world, ep, cp, latent in settings:
        per_rank = run_processes(_worker, world, (ep, cp, latent, args.rows, args.length, args.steps), timeout=600)
        row = {"world": world, "ep": ep, "cp": cp, "moe_latent_size": latent, "hidden_size": HIDDEN,
               "a2a_bytes_per_step_per_rank": [r["a2a_bytes_per_step"] for r in per_rank],
               "tokens_per_s_per_rank": [round(r["tokens_per_s_per_rank"], 1) for r in per_rank],
               "step_s": [round(r["step_s"], 3) for r in per_rank]}
        results.append(row)
        print(json.dumps(row))
    by = {(r["ep"], r["cp"], r["moe_latent_size"]): r for r in results}
    ratios = {}
    for cp in (1, 2):
        full, lat = by[(2, cp, None)], by[(2, cp, LATENT)]
        ratios[f"ep2_cp{cp}"] = sum(full["a2a_bytes_per_step_per_rank"]) / max(1, sum(lat["a2a_bytes_per_step_per_rank"]))
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
                          f"torch {torch.__version__}, gloo",
               "tokens_per_rank_step": args.rows * args.length, "results": results,
               "latent_byte_ratio": ratios, "expected_ratio_hidden_over_latent": HIDDEN / LATENT}
    print(json.dumps({"latent_byte_ratio": ratios, "expected": HIDDEN / LATENT}))
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
