"""Train a tiny Nemotron 3 with DGS (dual-way gradient sparsification, SAMomentum) on N CPU processes.

    accelerate launch --config_file examples/accelerate_cpu_2proc.yaml --num_processes 3 \
        examples/dgs_train.py --updates 200                       # 1 server + 2 workers, 1 % of entries each way
    accelerate launch --config_file examples/accelerate_cpu_2proc.yaml examples/dgs_train.py --ratio 1.0
    torchrun --nproc_per_node 3 examples/dgs_train.py --updates 200   # the same without Accelerate

Rank 0 is the parameter server; every other rank is an asynchronous worker training on its own stream of
synthetic "count up" sequences. ``--ratio 1.0`` sends dense messages (momentum ASGD, the baseline);
``--mode sync`` waits for every worker each update. Each rank prints one line at the end (the server: updates,
bytes per update each way; a worker: its steps and losses), and with ``--checkpoint PATH`` the server
writes its final model there. (The yaml makes ``accelerate launch`` use torchrun, which really starts N
processes on CPU; see the comment in it.)
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM
from transformers_nemotron3.dgs import DGSConfig, WarmupCosine, train_nemotron3_dgs

TINY = dict(vocab_size=128, hidden_size=64, hybrid_override_pattern="M*E", num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
            chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32)


def count_up_batches(rank: int, updates: int, rows: int = 8, length: int = 32):
    """This worker's batches: sequences counting up modulo the vocabulary from random starts (learnable)."""
    g = torch.Generator().manual_seed(1000 + rank)
    start = torch.randint(0, TINY["vocab_size"], (rows * updates, 1), generator=g)
    return ((start + torch.arange(length)) % TINY["vocab_size"]).split(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", "--steps", type=int, default=200, help="server model updates in total")
    parser.add_argument("--ratio", type=float, default=0.01, help="fraction of entries sent each way")
    parser.add_argument("--mode", default="async", choices=["async", "round_robin", "sync"])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.7)
    parser.add_argument("--checkpoint", default=None, help="server checkpoint path (written at the end)")
    cli = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("run me with several processes: accelerate launch --config_file "
                         "examples/accelerate_cpu_2proc.yaml examples/dgs_train.py (or torchrun --nproc_per_node 3)")
    if cli.updates < 1:
        raise ValueError(f"--updates {cli.updates}: pass at least 1")
    torch.set_num_threads(1)
    # gloo: DGS sends CPU tensors point to point. The long timeout: gloo fails the whole group on any expired
    # wait, so it must outlast the longest stall to survive; DGS has its own, shorter, worker timeouts.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=1))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model everywhere
    model = Nemotron3ForCausalLM(Nemotron3Config(**TINY)).float()
    config = DGSConfig(ratio=cli.ratio, mode=cli.mode, lr=cli.lr, momentum=cli.momentum,
                       total_updates=cli.updates, lr_lambda=WarmupCosine(cli.updates, cli.updates // 10),
                       checkpoint_path=cli.checkpoint, progress=rank == 0)
    result = train_nemotron3_dgs(model, count_up_batches(rank, cli.updates), config)
    if result.role == "worker":
        w = result.worker
        first, last = (w.losses[0], w.losses[-1]) if w.losses else (float("nan"), float("nan"))
        print(f"rank {rank}/{world} worker: {w.steps} steps, loss {first:.3f} -> {last:.3f}", flush=True)
    else:
        s = result.server
        dense = 4 * sum(p.numel() for p in model.parameters())
        print(f"rank {rank}/{world} server: {s.updates} updates, {s.bytes_up_per_update:.0f} B/update up, "
              f"{s.bytes_down_per_update:.0f} B/update down (dense: {dense} B)", flush=True)
    clean = result.role == "worker" or all(status in ("done", "stopped")
                                           for status in result.server.worker_status.values())
    if clean:  # a lost worker would block the collective shutdown
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
