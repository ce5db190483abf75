"""Train a tiny Nemotron 3 (M*E-ME) with expert + context parallelism from a plain Accelerate loop.

    accelerate launch --config_file examples/parallel/accelerate_cpu_2proc.yaml \
        examples/parallel/train_parallel.py --ep 2 --cp 1 --steps 30
    accelerate launch --config_file examples/parallel/accelerate_cpu_2proc.yaml \
        examples/parallel/train_parallel.py --ep 2 --cp 2 --steps 30   # CP=2 folded onto the EP=2 pair

Data: synthetic sequences of short repeating motifs (learnable, so the loss must go down). Every rank
builds the same global batch; `shard_batch` keeps this rank's data-parallel slice and, with cp > 1,
the model keeps its zig-zag slice of the sequence. Prints the global mean loss; with ``--save`` the
final weights are written once, in the official layout, from the sharded ranks.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM
from transformers_nemotron3.parallel import (
    Nemotron3ParallelConfig, is_expert_shard, param_groups_by_mesh, prepare_nemotron3_parallel,
)

TINY = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=8,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48, intermediate_size=40, hybrid_override_pattern="M*E-ME",
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


def global_batch(step: int, rows: int, length: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(step % 4)  # 4 recurring batches: quick to learn on CPU
    motifs = torch.randint(3, vocab, (rows, 4), generator=g)
    return {"input_ids": motifs.repeat(1, (length + 3) // 4)[:, :length]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--length", type=int, default=36)
    ap.add_argument("--rows", type=int, default=4, help="global batch rows (split over dp)")
    ap.add_argument("--capacity-factor", type=float, default=None)
    ap.add_argument("--save", default=None, help="folder for the final full checkpoint")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # same initial weights on every rank
    model = Nemotron3ForCausalLM(Nemotron3Config(**TINY)).float().train()
    pcfg = Nemotron3ParallelConfig(context_parallel_size=args.cp, expert_parallel_size=args.ep,
                                   capacity_factor=args.capacity_factor)
    par = prepare_nemotron3_parallel(model, pcfg)
    # one param group per device mesh (expert DTensors apart from the plain dense tensors): foreach / fused kernels
    optimizer = torch.optim.AdamW(param_groups_by_mesh(par.model.parameters()), lr=3e-3)
    ddp_model, optimizer = accelerator.prepare(par.model, optimizer)
    first = last = None
    for step in range(args.steps):
        batch = par.shard_batch(global_batch(step, args.rows, args.length, TINY["vocab_size"]))
        out = ddp_model(**batch)
        accelerator.backward(out.loss)  # expert shards all-reduce their gradients over edp in their own hooks
        accelerator.clip_grad_norm_(ddp_model.parameters(), 1.0)  # DTensor-aware: global norm over both meshes
        optimizer.step()
        optimizer.zero_grad()
        loss = par.mean_loss(out.loss)
        first = loss if first is None else first
        last = loss
        if step % 5 == 0 or step == args.steps - 1:
            accelerator.print(f"step {step:3d} loss {loss:.4f} (dp={pcfg.dp} cp={pcfg.cp} ep={pcfg.ep} "
                              f"edp={pcfg.edp}, world={accelerator.num_processes})")
    # dense weights must still be identical on every rank (DDP), expert shards must differ over ep
    dense = torch.stack([p.detach().double().sum() for n, p in par.base.named_parameters()
                         if not is_expert_shard(p)]).sum()
    spread = torch.stack([dense, -dense])
    torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
    accelerator.print(f"dense-weight checksum spread over ranks: {float(spread.sum()):.3e}")
    accelerator.print(f"first loss {first:.4f} -> last loss {last:.4f}: {'DOWN' if last < first else 'NOT DOWN'}")
    if args.save:
        par.save_checkpoint(args.save)
        accelerator.print(f"saved full official-layout checkpoint to {args.save}")


if __name__ == "__main__":
    main()
