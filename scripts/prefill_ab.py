"""Prefill time of one source tree's model, to compare two commits on the same machine (run alternately).

    git worktree add /tmp/old <commit>
    for i in 1 2 3; do for t in /tmp/old .; do PYTHONPATH=$t/src OMP_NUM_THREADS=2 python scripts/prefill_ab.py $t tiny 512; done; done

Prints the tree and the median seconds of ``model(ids, use_cache=True, logits_to_keep=1)`` over 5 runs after a warm-up
(the bench configs' random weights, fp32, batch 1).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main() -> None:
    tree, name, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.path.insert(0, tree + "/scripts")
    try:
        from bench_common import COMMON, CONFIGS
    except ImportError:  # older trees kept them in bench_inference
        from bench_inference import COMMON, CONFIGS
    from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = Nemotron3Config(**{**COMMON, **CONFIGS[name]})
    model = Nemotron3ForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (1, length))
    times = []
    with torch.inference_mode():
        for _ in range(6):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    print(f"{tree} {name} prefill {length}: {statistics.median(times[1:]) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
