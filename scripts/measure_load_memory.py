"""Peak memory of loading a checkpoint: ours vs transformers' native NemotronH on the same official files.

Writes a ~1 GB fp32 checkpoint in the official layout (one tensor per expert), then loads it in fresh child
processes with ``Nemotron3ForCausalLM.from_pretrained`` and ``NemotronHForCausalLM.from_pretrained`` and reports
each child's peak anonymous memory (``RssAnon`` high-water, sampled; mmap'd file pages excluded) as a multiple of
the checkpoint size.

    python scripts/measure_load_memory.py --out /tmp/loadmem [--size-gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import sys, threading, time, json
    import torch
    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    base = anon()
    peak = [base]
    stop = False
    def sample():
        while not stop:
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    which, folder = sys.argv[1], sys.argv[2]
    if which == "ours":
        from transformers_nemotron3 import Nemotron3ForCausalLM as cls
    else:
        from transformers import NemotronHForCausalLM as cls
    base = anon(); peak[0] = base
    t.start()
    start = time.perf_counter()
    model = cls.from_pretrained(folder, dtype=torch.float32)
    seconds = time.perf_counter() - start
    stop = True; t.join()
    peak[0] = max(peak[0], anon())
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"peak_anon_MiB": peak[0] - base, "params_MiB": params, "seconds": seconds}))
    """
)


def build(folder: str, size_gb: float) -> float:
    import torch

    from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM

    hidden = 1024
    experts = 16
    inter = 512
    per_moe = experts * 2 * hidden * inter * 4
    layers = max(1, int(size_gb * 2**30 / per_moe))
    pattern = "".join("ME"[i % 2] for i in range(2 * layers))[: 2 * layers - 1] + "*"
    config = Nemotron3Config(
        vocab_size=32000, hidden_size=hidden, hybrid_override_pattern=pattern, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, mamba_num_heads=16, mamba_head_dim=64, n_groups=2, ssm_state_size=64,
        n_routed_experts=experts, num_experts_per_tok=4, moe_intermediate_size=inter,
        moe_shared_expert_intermediate_size=1024, intermediate_size=2048,
    )
    with torch.device("cpu"):
        model = Nemotron3ForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="500MB")
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".safetensors")) / 2**20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the checkpoint (created)")
    p.add_argument("--size-gb", type=float, default=1.0)
    args = p.parse_args(argv)
    size = build(args.out, args.size_gb)
    results = {"checkpoint_MiB": size}
    for which in ("ours", "native"):
        proc = subprocess.run([sys.executable, "-c", CHILD, which, args.out], capture_output=True, text=True,
                              check=True)
        results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[which]["peak_over_checkpoint"] = results[which]["peak_anon_MiB"] / size
        print(f"{which:6s} peak anonymous {results[which]['peak_anon_MiB']:8.0f} MiB = "
              f"{results[which]['peak_over_checkpoint']:.2f}x the {size:.0f} MiB checkpoint, "
              f"{results[which]['seconds']:.1f} s")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
