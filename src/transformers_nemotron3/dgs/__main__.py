"""Demo / smoke run under torchrun: DGS-train a tiny Nemotron3ForCausalLM on synthetic tokens.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 3 -m transformers_nemotron3.dgs --updates 200

Rank 0 is the server, every other rank a worker. ``--ratio 1.0`` gives the dense baseline on the
same code path; ``--mode sync`` the synchronous one.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from .config import DGSConfig
from .schedules import WarmupCosine
from .train import train_nemotron3_dgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--mode", default="async", choices=["async", "round_robin", "sync"])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.7)
    parser.add_argument("--checkpoint", default=None, help="server checkpoint path (written at the end)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("run me under torchrun, e.g. torchrun --nproc_per_node 3 -m transformers_nemotron3.dgs")
    torch.set_num_threads(1)
    # gloo: DGS messages are CPU tensors (a model on a GPU still works, its flat copies live on CPU).
    # A long timeout: gloo turns any expired wait into an error for the whole group, so the group
    # timeout must exceed the longest stall we want to survive; DGS's own timeouts are shorter.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=1))
    from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM

    config = Nemotron3Config(
        vocab_size=128, hidden_size=64, hybrid_override_pattern="M*E", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    )
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(config).float()
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1000 + rank)
    start = torch.randint(0, 128, (8 * args.updates, 1), generator=g)
    batches = ((start + torch.arange(32)) % 128).split(8)  # "count up" sequences: learnable
    dgs_config = DGSConfig(ratio=args.ratio, mode=args.mode, lr=args.lr, momentum=args.momentum,
                           total_updates=args.updates, lr_lambda=WarmupCosine(args.updates, args.updates // 10),
                           checkpoint_path=args.checkpoint, progress=rank == 0)
    result = train_nemotron3_dgs(model, batches, dgs_config)
    if result.role == "worker":
        w = result.worker
        print(f"worker {rank}: {w.steps} steps, last loss {w.losses[-1] if w.losses else float('nan'):.3f}", flush=True)
    clean = result.role == "worker" or all(s in ("done", "stopped") for s in result.server.worker_status.values())
    if clean:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
