"""Training-step benchmark: our Nemotron3ForCausalLM vs transformers' native NemotronHForCausalLM.

Both models get the same random weights (`bench_common.build_pair`) and run in training mode with the LM loss
(``labels=input_ids``). In one process, interleaved (the order flips every repeat), with several repeats
(medians), for each config and batch x length shape we time

- ``fwd+bwd``: ``model(input_ids, labels=input_ids).loss.backward()``;
- ``optimizer``: one ``torch.optim.AdamW`` step (PyTorch's default foreach implementation) over the
  gradients just computed, then ``zero_grad(set_to_none=True)``;

and report tokens/s of the whole step (fwd+bwd + optimizer) and ours/native ratios. The native model runs
with its fastest experts implementation for this workload, picked by a short fwd+bwd measurement among
``eager``, ``grouped_mm`` and ``batched_mm`` (``--native-candidates``; or fixed with ``--native-experts``). Ours runs
with its own dispatcher and grouped GEMM, and on CPU with the package's CPU kernels (`enable_cpu_kernels`:
the Mamba-2 conv + SiLU and gated norm, forward and backward; ``--cpu-kernels off`` to skip) as "ours", and the
same model with them switched off as "ours_pytorch" (the plain PyTorch path, interleaved in the same run).
No aux loss, no MTP, no gradient checkpointing on either side.

    OMP_NUM_THREADS=2 python scripts/bench_training.py --config tiny small --threads 2 --repeats 5 \\
        --native-candidates eager grouped_mm --out docs/bench_results/cpu_t2_training.json

A benchmark, not a test: numbers depend on the machine; docs/benchmarks.md records the latest ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from bench_common import CONFIGS, build_pair, machine_info, pick_fastest_experts, timed

SHAPES = {"tiny": [(4, 256)], "small": [(2, 1024)], "latent": [(2, 512)]}  # batch x length per config (default)


def fwd_bwd(model, ids: torch.Tensor) -> None:
    """One training forward with the LM loss and its backward (gradients accumulate into ``.grad``)."""
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def run(args, name: str) -> dict:
    device = args.device
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    ours, native = build_pair(name, args.seed, dtype, device)
    ours.train()
    native.train()
    n_params = sum(p.numel() for p in ours.parameters())
    vocab = ours.config.vocab_size
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES[name]
    print(f"config {name}: {n_params / 1e6:.1f}M parameters, {device}, {args.dtype}, {args.threads} threads")
    g = torch.Generator().manual_seed(args.seed)
    if args.native_experts:
        impl = args.native_experts
        native.set_experts_implementation(impl)
    else:  # fastest for a training step, on a shorter sequence
        probe = torch.randint(3, vocab, (1, min(256, shapes[0][1])), generator=g).to(device)

        def measure(model) -> float:
            t = timed(lambda: fwd_bwd(model, probe), device)
            model.zero_grad(set_to_none=True)
            return t

        impl = pick_fastest_experts(native, measure, " (fwd+bwd)", tuple(args.native_candidates))
    print(f"  native experts implementation: {impl}")
    from transformers_nemotron3 import enable_cpu_kernels

    kernels = device == "cpu" and args.cpu_kernels == "on" and enable_cpu_kernels(ours)
    print(f"  CPU kernels: {'on (ours), off (ours_pytorch)' if kernels else 'off'}")
    # name -> (model, CPU kernels on while it runs); ours_pytorch is the same model with the kernels off
    models = {"ours": (ours, kernels), "native": (native, False)}
    if kernels:
        models["ours_pytorch"] = (ours, False)
    optims = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-5),
              "native": torch.optim.AdamW(native.parameters(), lr=1e-5)}
    optims["ours_pytorch"] = optims["ours"]  # one model, one optimizer
    results = {"config": name, "params_M": round(n_params / 1e6, 1), "device": device, "dtype": args.dtype,
               "threads": args.threads, "native_experts": impl, "cpu_kernels": kernels, "repeats": args.repeats,
               "rows": {}}

    def step(key: str, ids: torch.Tensor) -> tuple[float, float]:
        (model, on), opt = models[key], optims[key]
        if kernels and model is ours:  # the kernels are per model: only `ours` switches
            enable_cpu_kernels(ours, on)
        t_fb = timed(lambda: fwd_bwd(model, ids), device)
        t_opt = timed(opt.step, device)
        opt.zero_grad(set_to_none=True)
        return t_fb, t_opt

    for batch, length in shapes:
        ids = torch.randint(3, vocab, (batch, length), generator=g).to(device)
        for _ in range(args.warmup):
            for key in models:
                step(key, ids)
        times = {key: {"fwd_bwd": [], "optimizer": []} for key in models}
        names = list(models)
        for r in range(args.repeats):
            for key in (names if r % 2 == 0 else names[::-1]):
                t_fb, t_opt = step(key, ids)
                times[key]["fwd_bwd"].append(t_fb)
                times[key]["optimizer"].append(t_opt)
        row: dict = {"tokens": batch * length, "raw_s": times}
        for key in models:
            fb = statistics.median(times[key]["fwd_bwd"])
            opt = statistics.median(times[key]["optimizer"])
            total = statistics.median([a + b for a, b in zip(times[key]["fwd_bwd"], times[key]["optimizer"])])
            row[key] = {"fwd_bwd_s": fb, "optimizer_s": opt, "step_s": total, "tokens_per_s": batch * length / total}
        row["ratio_step"] = row["native"]["step_s"] / row["ours"]["step_s"]
        row["ratio_fwd_bwd"] = row["native"]["fwd_bwd_s"] / row["ours"]["fwd_bwd_s"]
        row["ratio_optimizer"] = row["native"]["optimizer_s"] / row["ours"]["optimizer_s"]
        if "ours_pytorch" in row:
            row["ratio_step_pytorch"] = row["native"]["step_s"] / row["ours_pytorch"]["step_s"]
        label = f"b{batch}x{length}"
        results["rows"][label] = row
        plain = (f", PyTorch path {row['ratio_step_pytorch']:.2f}x" if "ratio_step_pytorch" in row else "")
        print(f"  {label:<10} step: ours {row['ours']['step_s'] * 1e3:8.0f} ms  native "
              f"{row['native']['step_s'] * 1e3:8.0f} ms  ratio {row['ratio_step']:.2f}x   "
              f"(fwd+bwd {row['ratio_fwd_bwd']:.2f}x, optimizer {row['ratio_optimizer']:.2f}x{plain})", flush=True)
    return results


def table(all_results: list[dict]) -> str:
    """A markdown table of the runs (ratios are native time / our time: > 1 means ours is faster)."""
    lines = ["| config | batch x length | native experts | ours step ms | native step ms | step ratio | "
             "fwd+bwd ratio | optimizer ratio | step ratio, PyTorch path | ours tok/s | native tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in all_results:
        for label, row in res["rows"].items():
            o, n = row["ours"], row["native"]
            lines.append(f"| {res['config']} ({res['params_M']}M) | {label[1:].replace('x', ' x ')} | "
                         f"{res['native_experts']} | {o['step_s'] * 1e3:.0f} | {n['step_s'] * 1e3:.0f} | "
                         f"**{row['ratio_step']:.2f}x** | {row['ratio_fwd_bwd']:.2f}x | {row['ratio_optimizer']:.2f}x | "
                         f"{row.get('ratio_step_pytorch', row['ratio_step']):.2f}x | "
                         f"{o['tokens_per_s']:.0f} | {n['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), nargs="+", default=["tiny", "small"])
    p.add_argument("--shapes", nargs="*", default=None,
                   help="batch x length pairs like 4x256 (default: tiny 4x256, small 2x1024, latent 2x512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each model per shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--native-experts", default=None, choices=["eager", "grouped_mm", "batched_mm"],
                   help="default: the fastest for a training step")
    p.add_argument("--native-candidates", nargs="+", default=["eager", "grouped_mm", "batched_mm"],
                   choices=["eager", "grouped_mm", "batched_mm"],
                   help="implementations the fastest is picked from (batched_mm gathers one weight matrix per "
                        "token copy: on the small config it ran this 23 GB machine out of memory)")
    p.add_argument("--cpu-kernels", choices=["on", "off"], default="on",
                   help="run ours with the package's CPU kernels (and the PyTorch path beside it); CPU only")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats {args.repeats} / --warmup {args.warmup}: use repeats >= 1 and warmup >= 0.")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    machine = machine_info(args.device)
    all_results = []
    for name in args.config:
        res = run(args, name)
        res["machine"] = {**machine, "load_average_at_end": os.getloadavg(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        all_results.append(res)
        if args.out:  # after each config, so a long run leaves its finished configs on disk
            with open(args.out, "w") as f:
                json.dump(all_results, f, indent=1)
    print()
    print(table(all_results))
    print(f"\nstep ratio = native step time / our step time (median of {args.repeats} interleaved repeats)")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
