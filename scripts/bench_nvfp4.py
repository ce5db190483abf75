"""NVFP4 emulation: quantization error, overhead versus BF16, and a BF16-vs-NVFP4 training run.

Runs in one process, side by side, and prints a markdown report (numbers go to docs/nvfp4.md):

1. relative RMSE / SQNR of NVFP4 quantize-dequantize on N(0,1) data (1x16, 16x16, SR);
2. time of a linear layer's forward+backward and of a tiny Nemotron 3 training step, BF16
   autocast versus NVFP4 emulation (same model, same data);
3. a tiny Nemotron 3 trained ``--steps`` steps on synthetic Markov-chain text in BF16 autocast and
   in NVFP4 (``prepare_nvfp4`` with the Super recipe, or every GEMM with ``--recipe all``), same
   seed and data; the loss gap of the last 10 steps.

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_nvfp4.py                # all three parts, 200 steps
    OMP_NUM_THREADS=1 python scripts/bench_nvfp4.py --steps 50 --skip-timing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn as nn

from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM
from transformers_nemotron3.nvfp4 import NVFP4Linear, NVFP4Recipe, prepare_nvfp4, quantize_dequantize

TINY = dict(
    vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=8,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    intermediate_size=40, initializer_range=0.05, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    hybrid_override_pattern="M*E-ME",
)

ALL_NVFP4 = NVFP4Recipe(bf16_last_fraction=0.0, bf16_patterns=("*embeddings*", "lm_head", "*.mixer.gate"),
                        mamba_out_proj="nvfp4")


def markov_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Synthetic text: a fixed random first-order Markov chain, 3 likely successors per token."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(3, vocab, (vocab, 3), generator=g)
    probs = torch.tensor([0.6, 0.3, 0.1])
    out = []
    for _ in range(steps):
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(3, vocab, (batch,), generator=g)
        for t in range(1, seq):
            pick = torch.multinomial(probs, batch, replacement=True, generator=g)
            x[:, t] = succ[x[:, t - 1], pick]
        out.append(x)
    return out


def train(recipe: NVFP4Recipe | None, batches: list[torch.Tensor], lr: float = 3e-3, seed: int = 0) -> tuple[list[float], float]:
    """Train the tiny model under BF16 autocast; ``recipe=None`` means plain BF16. Returns losses, s/step."""
    torch.manual_seed(seed)
    model = Nemotron3ForCausalLM(Nemotron3Config(**TINY)).train()
    if recipe is not None:
        prepare_nvfp4(model, recipe, backend="emulation")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    torch.manual_seed(seed + 1)  # same stochastic-rounding stream start for every NVFP4 run
    losses = []
    t0 = time.perf_counter()
    for ids in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, (time.perf_counter() - t0) / len(batches)


def quant_error() -> dict[str, float]:
    x = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    rel = lambda y: ((x - y).norm() / x.norm()).item()  # noqa: E731
    g = torch.Generator().manual_seed(1)
    sr_draws = [quantize_dequantize(x, stochastic=True, generator=g) for _ in range(32)]
    return {
        "1x16 RNE": rel(quantize_dequantize(x)),
        "16x16 RNE": rel(quantize_dequantize(x, block_2d=True)),
        "1x16 SR, one draw": rel(sr_draws[0]),
        "1x16 SR, mean of 32": rel(torch.stack(sr_draws).mean(0)),
    }


def time_it(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def linear_overhead(tokens: int = 2048, d_in: int = 1024, d_out: int = 1024, reps: int = 5) -> dict[str, float]:
    lin = nn.Linear(d_in, d_out)
    q = NVFP4Linear.from_linear(lin)
    x = torch.randn(tokens, d_in, requires_grad=True)

    def step(module):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = module(x)
            y.float().sum().backward()
        return run

    bf16, nvfp4 = time_it(step(lin), reps), time_it(step(q), reps)
    return {"bf16_s": bf16, "nvfp4_s": nvfp4, "ratio": nvfp4 / bf16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--recipe", choices=["super", "all"], default="super")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--json", type=str, default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    if args.steps < 10:
        raise SystemExit(f"--steps {args.steps}: need at least 10 steps (the loss gap averages the last 10).")

    report: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"threads {torch.get_num_threads()}",
    }
    print(f"# NVFP4 emulation benchmark\n\nmachine: {report['machine']}\n")

    err = quant_error()
    report["quant_error"] = err
    print("| quantizer (N(0,1), 2048x2048) | rel. RMSE | SQNR dB |\n|---|---|---|")
    for k, v in err.items():
        print(f"| {k} | {v:.4f} | {-20 * math.log10(v):.2f} |")

    if not args.skip_timing:
        lo = linear_overhead()
        report["linear_overhead"] = lo
        print(f"\nlinear 2048x1024x1024 fwd+bwd: BF16 {lo['bf16_s'] * 1e3:.1f} ms, NVFP4 emulation "
              f"{lo['nvfp4_s'] * 1e3:.1f} ms, ratio {lo['ratio']:.2f}x")

    batches = markov_batches(args.steps, args.batch, args.seq, TINY["vocab_size"])
    recipe = NVFP4Recipe() if args.recipe == "super" else ALL_NVFP4
    bf16_losses, bf16_step = train(None, batches)
    q_losses, q_step = train(recipe, batches)
    tail = lambda ls: sum(ls[-10:]) / 10  # noqa: E731
    gap = (tail(q_losses) - tail(bf16_losses)) / tail(bf16_losses)
    report["training"] = {
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "recipe": args.recipe,
        "bf16_first": bf16_losses[0], "bf16_last10": tail(bf16_losses), "nvfp4_last10": tail(q_losses),
        "relative_gap": gap, "bf16_s_per_step": bf16_step, "nvfp4_s_per_step": q_step,
        "step_ratio": q_step / bf16_step,
    }
    print(f"\n| run ({args.steps} steps, batch {args.batch}x{args.seq}, recipe {args.recipe}) | first loss | "
          f"mean loss, last 10 steps | s/step |\n|---|---|---|---|")
    print(f"| BF16 autocast | {bf16_losses[0]:.4f} | {tail(bf16_losses):.4f} | {bf16_step:.3f} |")
    print(f"| NVFP4 emulation | {q_losses[0]:.4f} | {tail(q_losses):.4f} | {q_step:.3f} |")
    print(f"\nrelative loss gap (NVFP4 - BF16) / BF16: {gap:+.2%}; step-time ratio {q_step / bf16_step:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    sys.exit(0 if abs(gap) < 0.03 else 1)


if __name__ == "__main__":
    main()
