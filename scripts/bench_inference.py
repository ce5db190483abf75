"""Side-by-side inference benchmark: our Nemotron3ForCausalLM vs transformers' native NemotronHForCausalLM.

Both models get the same random weights (built from a seed). In one process, interleaved, with
several repeats (medians), we measure:

- prefill tokens/s at 512 and 2048 tokens (batch 1, logits of the last position only, as generate does);
- decode tokens/s at batch 1 and batch 8 for 128 new tokens (greedy ``generate``; the time of a
  1-token generate with the same prompt is subtracted, so only the decode steps count);
- peak memory of one workload (prefill of the longest length, then 16 decode steps at the largest
  batch): CUDA ``max_memory_allocated`` growth; on CPU the peak-RSS growth of a forked child that
  runs the workload once (RSS is per process, so each model is measured in its own child).

On CPU it also measures the DRAM floor of decode: the bytes of weights one step must read
(`decode_weight_bytes`) over the streaming bandwidth of matrix-vector products over a buffer larger
than the caches (`stream_bandwidth`), and so the largest speed-up over native an implementation reading
those weights from DRAM could reach. Models whose weights partly stay in the last-level cache between
steps (the 2-core VM reports a 480 MB L3) can run faster than this floor.

On CPU "ours" runs with the package's CPU decode kernels (`enable_cpu_kernels`, built on first use)
when they build here, and the same model is also measured with them off ("ours, PyTorch paths"),
interleaved with the other two; ``--cpu-kernels off`` measures only the PyTorch paths.

The native model runs with its fastest experts implementation, chosen by a short measurement among
``eager``, ``grouped_mm`` and ``batched_mm`` (or fixed with ``--native-experts``).

    python scripts/bench_inference.py --config tiny --threads 2 --repeats 3 --out bench_tiny.json
    python scripts/bench_inference.py --config small --threads 2 --repeats 3 --out bench_small.json

A benchmark, not a test: numbers depend on the machine; docs/benchmarks.md records the latest ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench_common import CONFIGS, build_pair, machine_info, pick_fastest_experts, sync


@torch.inference_mode()
def time_prefill(model, ids, device) -> float:
    sync(device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - t


@torch.inference_mode()
def time_generate(model, ids, new: int, device) -> float:
    sync(device)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    sync(device)
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - t


def pick_native_experts(native, vocab: int, device: str) -> str:
    """The fastest experts implementation of the native model on a short prefill + decode."""
    ids = torch.randint(3, vocab, (1, 64), device=device)

    def measure(model) -> float:
        time_generate(model, ids, 4, device)
        return time_prefill(model, ids, device) + time_generate(model, ids, 8, device)

    return pick_fastest_experts(native, measure)


def peak_memory(model, task, device: str) -> float:
    """Peak memory in MiB of ``task(model)``: CUDA allocator peak, or RSS growth of a forked child on CPU."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        task(model)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report, exit without cleanup
        os.close(read)
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork (a parallel region would hang)
        try:  # reset the peak-RSS mark to the current RSS, so the parent's earlier peaks do not hide ours
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _rss_mib("VmRSS")
        except OSError:
            before = _rss_mib("VmHWM")
        task(model)
        peak = _rss_mib("VmHWM")
        os.write(write, f"{max(peak - before, 0.0)}".encode())
        os._exit(0)
    os.close(write)
    data = os.read(read, 64)
    os.waitpid(pid, 0)
    return float(data.decode() or "nan")


def decode_weight_bytes(model, batch: int) -> float:
    """Bytes of weights one decode step reads: everything but the embedding table and the MTP head, with each
    MoE layer's routed experts counted by the expected number of distinct experts its ``batch`` tokens pick
    (exactly top-k at batch 1; ``E (1 - (1 - k/E)^batch)`` under uniform routing for a batch)."""
    cfg = model.config
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    used = e * (1.0 - (1.0 - k / e) ** batch) if e else 0.0
    total = 0.0
    for name, p in model.named_parameters():
        if "embeddings" in name or name.startswith("mtp."):
            continue
        share = used / e if ".experts." in name else 1.0
        total += p.numel() * p.element_size() * share
    return total


def stream_bandwidth(threads: int, megabytes: int = 768) -> float:
    """GB/s of matrix-vector products streaming ``megabytes`` of fp32 weights from memory (this machine's
    ceiling for batch-1 decode, where every weight is read once per token): the faster of MKL's GEMV and,
    when enabled, the package's few-row kernel."""
    from transformers_nemotron3.cpu_kernels import build

    torch.set_num_threads(threads)
    mats = [torch.randn(4096, 1024) for _ in range(megabytes // 16)]
    x = torch.randn(1, 1024)
    products = [torch.nn.functional.linear]
    ops = build.kernel_ops()
    if ops is not None:
        products.append(lambda a, w: ops.small_linear(a, w, None))
    best = 0.0
    for product in products:
        for m in mats:  # touch once
            product(x, m)
        for _ in range(3):
            t = time.perf_counter()
            for m in mats:
                product(x, m)
            best = max(best, len(mats) * mats[0].numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def _rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def run(args) -> dict:
    device = args.device
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    ours, native = build_pair(args.config, args.seed, dtype, device)
    n_params = sum(p.numel() for p in ours.parameters())
    vocab = ours.config.vocab_size
    print(f"config {args.config}: {n_params / 1e6:.1f}M parameters, {device}, {args.dtype}, {args.threads} threads")
    impl = args.native_experts or pick_native_experts(native, vocab, device)
    native.set_experts_implementation(impl)
    print(f"  native experts implementation: {impl}")
    from transformers_nemotron3 import enable_cpu_kernels

    kernels = device == "cpu" and args.cpu_kernels == "on" and enable_cpu_kernels(ours)
    print(f"  CPU decode kernels: {'on (ours), off (ours_pytorch)' if kernels else 'off'}")
    # name -> (model, CPU kernels on while it runs)
    models = {"ours": (ours, kernels), "native": (native, False)}
    if kernels:
        models["ours_pytorch"] = (ours, False)
    g = torch.Generator().manual_seed(args.seed)
    results: dict = {"config": args.config, "params_M": round(n_params / 1e6, 1), "device": device,
                     "dtype": args.dtype, "threads": args.threads, "native_experts": impl, "cpu_kernels": kernels,
                     "rows": {}}

    def call(name: str, fn):
        model, on = models[name]
        if kernels and model is ours:  # the kernels are per model: only `ours` switches
            enable_cpu_kernels(ours, on)
        return fn(model)

    def measure(label: str, fn, work: float) -> None:
        times = {name: [] for name in models}
        for _ in range(args.warmup):
            for name in models:
                call(name, fn)
        names = list(models)
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(call(name, fn))
        row = {name: work / statistics.median(ts) for name, ts in times.items()}
        row["ratio"] = row["ours"] / row["native"]
        extra = ""
        if "ours_pytorch" in row:
            row["ratio_pytorch"] = row["ours_pytorch"] / row["native"]
            extra = f"   (PyTorch paths {row['ours_pytorch']:9.1f} tok/s, {row['ratio_pytorch']:.2f}x)"
        row["raw_s"] = times
        results["rows"][label] = row
        print(f"  {label:<22} ours {row['ours']:9.1f} tok/s   native {row['native']:9.1f} tok/s   "
              f"ratio {row['ratio']:.2f}x{extra}", flush=True)

    for length in [] if args.memory_only else args.prefill:
        ids = torch.randint(3, vocab, (1, length), generator=g).to(device)
        measure(f"prefill_{length}", lambda m, ids=ids: time_prefill(m, ids, device), length)
    for batch in [] if args.memory_only else args.decode_batch:
        ids = torch.randint(3, vocab, (batch, args.prompt), generator=g).to(device)

        def decode(m, ids=ids):
            return time_generate(m, ids, args.new_tokens, device) - time_generate(m, ids, 1, device)

        measure(f"decode_b{batch}", decode, batch * (args.new_tokens - 1))
    if device == "cpu" and args.decode_batch and not args.no_floor and not args.memory_only:
        bw = stream_bandwidth(args.threads)
        floors = {}
        for batch in args.decode_batch:
            row = results["rows"][f"decode_b{batch}"]
            nbytes = decode_weight_bytes(ours, batch)
            floor_s = nbytes / (bw * 1e9)  # per step of `batch` tokens
            native_s = batch / row["native"]
            floors[f"decode_b{batch}"] = {"weight_MB": nbytes / 1e6, "stream_GBps": bw, "floor_ms": floor_s * 1e3,
                                          "native_ms": native_s * 1e3, "ours_ms": batch / row["ours"] * 1e3,
                                          "max_ratio": native_s / floor_s}
            print(f"  decode_b{batch} floor: {nbytes / 1e6:.0f} MB of weights per step at {bw:.1f} GB/s = "
                  f"{floor_s * 1e3:.2f} ms; native {native_s * 1e3:.2f} ms, ours {batch / row['ours'] * 1e3:.2f} ms: "
                  f"reading these {args.dtype} weights from DRAM caps the speed-up over native at "
                  f"{native_s / floor_s:.2f}x here (weights left in the cache from the last step can beat it)")
        results["decode_floor"] = floors
    if not args.no_memory:
        ids_p = torch.randint(3, vocab, (1, max(args.prefill or [512])), generator=g).to(device)
        ids_d = torch.randint(3, vocab, (max(args.decode_batch or [1]), args.prompt), generator=g).to(device)

        def workload(m):
            time_prefill(m, ids_p, device)
            time_generate(m, ids_d, min(args.new_tokens, 16), device)

        mem = {name: call(name, lambda m: peak_memory(m, workload, device)) for name in ("ours", "native")}
        mem["ratio"] = mem["ours"] / mem["native"] if mem["native"] else float("nan")
        results["peak_memory_MiB"] = mem
        print(f"  peak memory MiB       ours {mem['ours']:9.1f}         native {mem['native']:9.1f}         "
              f"ratio {mem['ratio']:.2f}x")
    return results


def table(results: dict) -> str:
    both = results.get("cpu_kernels", False)
    lines = [f"config `{results['config']}` ({results['params_M']}M params, {results['device']}, {results['dtype']}, "
             f"{results['threads']} threads, native experts `{results['native_experts']}`, CPU kernels "
             f"{'on' if both else 'off'})", ""]
    if both:
        lines += ["| measure | ours | native | ours/native | ours, PyTorch paths | PyTorch paths/native |",
                  "|---|---|---|---|---|---|"]
    else:
        lines += ["| measure | ours | native | ours/native |", "|---|---|---|---|"]
    for label, row in results["rows"].items():
        extra = f" {row['ours_pytorch']:.1f} | {row['ratio_pytorch']:.2f}x |" if both else ""
        lines.append(f"| {label} tok/s | {row['ours']:.1f} | {row['native']:.1f} | {row['ratio']:.2f}x |{extra}")
    for label, f in results.get("decode_floor", {}).items():
        lines.append(f"| {label} DRAM floor ms/step | {f['ours_ms']:.2f} (floor {f['floor_ms']:.2f}) | "
                     f"{f['native_ms']:.2f} | {f['max_ratio']:.2f}x at the DRAM floor |")
    if "peak_memory_MiB" in results:
        m = results["peak_memory_MiB"]
        lines.append(f"| peak memory MiB | {m['ours']:.0f} | {m['native']:.0f} | {m['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), nargs="+", default=["tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each measurement per model")
    p.add_argument("--prefill", type=int, nargs="*", default=[512, 2048], help="lengths; none to skip")
    p.add_argument("--decode-batch", type=int, nargs="*", default=[1, 8], help="batch sizes; none to skip")
    p.add_argument("--prompt", type=int, default=32, help="prompt length for the decode measurements")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--native-experts", default=None, help="eager | grouped_mm | batched_mm (default: fastest)")
    p.add_argument("--cpu-kernels", choices=["on", "off"], default="on",
                   help="on: ours with the CPU decode kernels, plus its PyTorch paths as a third column")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-floor", action="store_true", help="skip the memory-bandwidth floor of decode (CPU)")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory workload")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    machine = machine_info(args.device)
    all_results = []
    for name in args.config:
        args.config_name = name
        res = run(argparse.Namespace(**{**vars(args), "config": name}))
        res["machine"] = {**machine, "load_average_at_end": os.getloadavg()}
        all_results.append(res)
        print()
        print(table(res))
        print()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(all_results, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
