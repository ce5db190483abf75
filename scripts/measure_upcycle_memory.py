"""Peak RSS of the offline `nemotron3 upcycle` on a ~200M-parameter dense Llama built locally.

Usage: OMP_NUM_THREADS=1 python scripts/measure_upcycle_memory.py [--workdir DIR] [--experts 8 --top-k 2]

Builds the dense model (bf16 safetensors), runs the CLI in a fresh process, samples that process's RSS
every 20 ms with psutil, and prints the peak next to the sizes that matter: one dense layer, one MoE
layer, the whole dense and MoE checkpoints, and the RSS of a process that only imports the package.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

MiB = 2**20


def peak_rss(cmd: list[str]) -> tuple[int, float, int]:
    """Run ``cmd``; return (peak RSS bytes of the process tree, seconds, exit code)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    return peak, time.time() - start, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed at the end)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--granularity", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=2)
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(args.workdir or tempfile.mkdtemp(prefix="upcycle-mem-"))
    dense_dir, moe_dir = work / "dense", work / "moe"
    shutil.rmtree(moe_dir, ignore_errors=True)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    if not (dense_dir / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(dense_dir, max_shard_size="200MB")
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    dense_layer = (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) * 2
    moe_layer = dense_layer + (args.experts - 1) * 3 * h * i * 2 + args.experts * args.granularity * h * 4
    dense_total = sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))
    nparams = dense_total // 2
    base, _, _ = peak_rss([sys.executable, "-c", "import transformers_nemotron3.upcycling"])
    cmd = [sys.executable, "-m", "transformers_nemotron3.upcycling.cli", str(dense_dir), str(moe_dir),
           "--experts", str(args.experts), "--granularity", str(args.granularity), "--top-k", str(args.top_k),
           "--max-shard-size", "1GB", "--no-progress"]
    peak, seconds, rc = peak_rss(cmd)
    moe_total = sum(f.stat().st_size for f in moe_dir.glob("*.safetensors")) if rc == 0 else 0
    print(f"dense model: {nparams / 1e6:.0f}M params, {dense_total / MiB:.0f} MiB bf16; "
          f"E{args.experts} G{args.granularity} T{args.top_k} output {moe_total / MiB:.0f} MiB (exit code {rc}, {seconds:.1f} s)")
    print(f"one dense layer {dense_layer / MiB:.0f} MiB, one MoE layer {moe_layer / MiB:.0f} MiB")
    print(f"RSS of a process that only imports the package: {base / MiB:.0f} MiB")
    print(f"peak RSS of `nemotron3 upcycle`: {peak / MiB:.0f} MiB "
          f"(above the import baseline: {(peak - base) / MiB:.0f} MiB)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
