"""Train a small Nemotron 3 model with an MTP head on a synthetic corpus, then measure MTP speculation.

The corpus is a noisy cyclic chain: each token is followed by ``perm[token]`` with probability
``1 - noise`` and by a random token otherwise, so both the next token and the one after it are
learnable. The whole model trains with the causal-LM loss plus ``mtp_loss_scale`` (0.3) times the
MTP loss (``Nemotron3ForCausalLM.forward`` with ``labels``), for a few hundred steps. Afterwards,
on held-out prompts:

- mean acceptance length of `mtp_generate` for k = 1, 2, 3 drafts (tokens per main-model forward);
- wall-clock greedy decode with MTP vs without (``num_draft_tokens=0``, the same cached loop),
  interleaved, medians; and a check that both produce the same tokens.

    python scripts/train_mtp_head.py --steps 300 --threads 2 --out mtp_bench.json

A benchmark/example, not a test; docs/benchmarks.md records the latest numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM
from transformers_nemotron3.generation import mtp_generate

MODEL = dict(
    vocab_size=256, hidden_size=128, hybrid_override_pattern="MEMEM*EMMEMEM*EM", num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, mamba_num_heads=4, mamba_head_dim=32, n_groups=2, ssm_state_size=16,
    conv_kernel=4, chunk_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
    moe_shared_expert_intermediate_size=256, intermediate_size=384, routed_scaling_factor=2.5,
    num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", initializer_range=0.02,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def corpus(n: int, length: int, vocab: int, noise: float, perm: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    seqs = torch.empty(n, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(3, vocab, (n,), generator=gen)
    for t in range(1, length):
        follow = perm[seqs[:, t - 1]]
        rand = torch.randint(3, vocab, (n,), generator=gen)
        seqs[:, t] = torch.where(torch.rand(n, generator=gen) < noise, rand, follow)
    return seqs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=48)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-kernels", action="store_true",
                   help="decode with the CPU decode kernels (enable_cpu_kernels) after training")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = Nemotron3Config(**MODEL)
    model = Nemotron3ForCausalLM(config)
    vocab = config.vocab_size
    perm = torch.randperm(vocab - 3, generator=gen) + 3
    perm = torch.cat([torch.arange(3), perm])
    print(f"model: {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters "
          f"(MTP head {sum(q.numel() for q in model.mtp.parameters()) / 1e6:.1f}M), mtp_loss_scale "
          f"{config.mtp_loss_scale}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    t0 = time.perf_counter()
    log = []
    for step in range(args.steps):
        ids = corpus(args.batch, args.length, vocab, args.noise, perm, gen)
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            row = {"step": step, "lm_loss": float(out.lm_loss.detach()), "mtp_loss": float(out.mtp_loss.detach())}
            log.append(row)
            print(f"  step {step:4d}  lm loss {row['lm_loss']:.3f}  mtp loss {row['mtp_loss']:.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    if args.cpu_kernels:
        from transformers_nemotron3 import enable_cpu_kernels

        print(f"  CPU decode kernels: {'on' if enable_cpu_kernels(model) else 'unavailable'}")

    prompts = [corpus(1, 16, vocab, 0.0, perm, gen) for _ in range(args.prompts)]
    results = {"train": log, "train_seconds": time.perf_counter() - t0, "acceptance": {}, "decode": {}}
    for k in (1, 2, 3):
        lengths = []
        for prompt in prompts:
            ids, stats = mtp_generate(model, prompt, args.new_tokens, num_draft_tokens=k, return_stats=True)
            plain = mtp_generate(model, prompt, args.new_tokens, num_draft_tokens=0)
            assert torch.equal(ids, plain), "MTP decoding changed the greedy output"
            lengths.append(stats["mean_acceptance_length"])
        results["acceptance"][k] = statistics.mean(lengths)
        print(f"  k={k}: mean acceptance length {results['acceptance'][k]:.2f} tokens per main-model forward")

    for k in (0, 1, 2, 3):
        results["decode"][k] = []
    for r in range(args.repeats):  # interleaved wall-clock
        for k in ((0, 1, 2, 3) if r % 2 == 0 else (3, 2, 1, 0)):
            t = time.perf_counter()
            for prompt in prompts:
                mtp_generate(model, prompt, args.new_tokens, num_draft_tokens=k)
            results["decode"][k].append(time.perf_counter() - t)
    total = args.prompts * args.new_tokens
    base = statistics.median(results["decode"][0])
    print(f"  decode without MTP: {total / base:.1f} tok/s")
    results["tokens_per_s"] = {}
    for k in (0, 1, 2, 3):
        med = statistics.median(results["decode"][k])
        results["tokens_per_s"][k] = total / med
        if k:
            print(f"  decode with MTP k={k}: {total / med:.1f} tok/s  ({base / med:.2f}x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
