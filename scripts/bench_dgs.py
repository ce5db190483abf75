"""DGS versus dense on local CPU processes: bytes per update in both directions, and loss.

For each worker count (1 server + 2 workers, 1 server + 4 workers) and each model (a small MLP
regression, a tiny Nemotron3ForCausalLM), runs the same number of server updates with
  * dgs        ratio 0.01 up and down (the paper's top 1 %), asynchronous
  * dense      ratio 1.0, asynchronous (ASGD with per-worker momentum: DGS without sparsification)
  * dense-sync ratio 1.0, synchronous (one update = mean of all workers' velocities)
and records bytes/update (headers and indices included; the one-off full model sent at join is
amortised into the "down" figure), the final held-out loss and a smoothed training-loss curve.

    OMP_NUM_THREADS=1 python scripts/bench_dgs.py --out runs/dgs_bench   # writes JSON + PNG
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from torch import nn

from transformers_nemotron3.dgs import DGSConfig, launch_local, train_dgs

VOCAB, SEQ, BATCH = 128, 32, 8


# ---------------------------------------------------------------- tasks
def mlp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))


def mlp_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    w1, w2 = torch.randn(16, 32, generator=g) / 4, torch.randn(32, 1, generator=g) / 32 ** 0.5
    g.manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(n, 1, generator=g)


def mlp_loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def mlp_batches(rank: int, steps: int):
    x, y = mlp_data(1000 + rank, 32 * steps)
    for i in range(steps):
        yield x[32 * i:32 * (i + 1)], y[32 * i:32 * (i + 1)]


def nemotron_model() -> nn.Module:
    from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM

    cfg = Nemotron3Config(
        vocab_size=VOCAB, hidden_size=64, hybrid_override_pattern="M*E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
        chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
    )
    torch.manual_seed(0)
    return Nemotron3ForCausalLM(cfg).float()


def markov_tokens(seed: int, n_seq: int) -> torch.Tensor:
    """Sequences from a fixed random Markov chain with 4 successors per token (best loss ~ ln 4)."""
    g = torch.Generator().manual_seed(7)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)
    g.manual_seed(seed)
    seqs = torch.empty(n_seq, SEQ, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, VOCAB, (n_seq,), generator=g)
    for t in range(1, SEQ):
        seqs[:, t] = successors[seqs[:, t - 1], torch.randint(0, 4, (n_seq,), generator=g)]
    return seqs


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def lm_batches(rank: int, steps: int):
    data = markov_tokens(1000 + rank, BATCH * steps)
    for i in range(steps):
        yield data[BATCH * i:BATCH * (i + 1)]


TASKS = {
    "mlp": dict(model=mlp_model, loss=mlp_loss, batches=mlp_batches, eval=lambda: mlp_data(1, 4096),
                lr=0.05, momentum=0.7),
    "nemotron": dict(model=nemotron_model, loss=lm_loss, batches=lm_batches, eval=lambda: markov_tokens(1, 256),
                     lr=0.1, momentum=0.7),
}


# ---------------------------------------------------------------- one run
def _rank_main(rank: int, world: int, task: str, config: DGSConfig, steps: int):
    torch.set_num_threads(1)
    spec = TASKS[task]
    model = spec["model"]()
    result = train_dgs(model, spec["loss"], spec["batches"](rank, steps), config)
    if result.role == "server":
        with torch.no_grad():
            model.eval()
            ev = spec["eval"]()
            loss = float(spec["loss"](model, ev))
        return {"server": result.server, "eval_loss": loss}
    return {"worker": result.worker}


def run_one(task: str, workers: int, variant: str, updates: int) -> dict:
    spec = TASKS[task]
    ratio = 0.01 if variant == "dgs" else 1.0
    mode = "sync" if variant == "dense-sync" else "async"
    config = DGSConfig(ratio=ratio, mode=mode, lr=spec["lr"], momentum=spec["momentum"], total_updates=updates,
                       progress=False, worker_timeout=60.0)
    steps = updates + 5 if mode == "sync" else updates  # enough data for any arrival order
    start = time.perf_counter()
    out = launch_local(_rank_main, workers + 1, args=(task, config, steps), timeout=600)
    wall = time.perf_counter() - start
    s = out[0]["server"]
    per_update: dict[int, list[float]] = {}
    for step, _, loss in s.losses:  # sync mode logs one loss per worker per update: average them
        per_update.setdefault(step, []).append(loss)
    losses = [sum(v) / len(v) for _, v in sorted(per_update.items())]
    return {
        "task": task, "workers": workers, "variant": variant, "updates": s.updates, "ratio": ratio, "mode": mode,
        "bytes_up_per_update": s.bytes_up_per_update, "bytes_down_per_update": s.bytes_down_per_update,
        "full_replies": s.full_replies, "final_eval_loss": out[0]["eval_loss"],
        "final_train_loss_avg50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "updates_per_worker": s.updates_per_worker, "wall_seconds": wall, "train_losses": losses,
    }


def smooth(values: list[float], window: int = 25) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/dgs_bench")
    parser.add_argument("--tasks", default="mlp,nemotron")
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--updates", type=int, default=0, help="server updates per run (0: per-task default)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    default_updates = {"mlp": 1200, "nemotron": 600}
    runs = []
    from tqdm.auto import tqdm

    plan = [(t, int(w), v) for t in args.tasks.split(",") for w in args.workers.split(",")
            for v in ("dgs", "dense", "dense-sync")]
    for task, workers, variant in tqdm(plan, desc="bench_dgs"):
        r = run_one(task, workers, variant, args.updates or default_updates[task])
        runs.append(r)
        tqdm.write(f"{task:8s} 1+{workers} {variant:10s} eval loss {r['final_eval_loss']:.4f}  "
                   f"up {r['bytes_up_per_update']:.0f} B/upd  down {r['bytes_down_per_update']:.0f} B/upd  "
                   f"{r['wall_seconds']:.1f} s")
    summary = []
    for task in args.tasks.split(","):
        for workers in map(int, args.workers.split(",")):
            by = {r["variant"]: r for r in runs if r["task"] == task and r["workers"] == workers}
            d, b = by["dgs"], by["dense"]
            summary.append({
                "task": task, "workers": workers,
                "up_reduction": b["bytes_up_per_update"] / d["bytes_up_per_update"],
                "down_reduction": b["bytes_down_per_update"] / d["bytes_down_per_update"],
                "loss_dgs": d["final_eval_loss"], "loss_dense": b["final_eval_loss"],
                "loss_dense_sync": by["dense-sync"]["final_eval_loss"],
                "loss_rel_to_dense": d["final_eval_loss"] / b["final_eval_loss"] - 1,
            })
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
               "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    with open(os.path.join(args.out, "bench_dgs.json"), "w") as f:
        json.dump({"machine": machine, "summary": summary, "runs": runs}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tasks = args.tasks.split(",")
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for r in (r for r in runs if r["task"] == task):
                ax.plot(smooth(r["train_losses"]), label=f"1+{r['workers']} {r['variant']}",
                        linestyle="-" if r["variant"] == "dgs" else "--")
            ax.set(title=f"{task}: worker minibatch loss (moving avg 25)", xlabel="server update", ylabel="loss")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_dgs_loss.png"), dpi=110)
    except ImportError:
        print("matplotlib not installed: no PNG written")
    print("\nsummary (DGS at 1 % vs dense, same number of server updates):")
    for s in summary:
        print(f"  {s['task']:8s} 1+{s['workers']}: bytes up /{s['up_reduction']:.1f}, down /{s['down_reduction']:.1f}; "
              f"loss dgs {s['loss_dgs']:.4f} vs dense {s['loss_dense']:.4f} ({100 * s['loss_rel_to_dense']:+.1f} %), "
              f"dense-sync {s['loss_dense_sync']:.4f}")
    print(f"wrote {args.out}/bench_dgs.json and bench_dgs_loss.png")


if __name__ == "__main__":
    main()
