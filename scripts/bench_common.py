"""Helpers shared by the benchmark scripts (`bench_inference.py`, `bench_training.py`): the benchmark configs,
our model and transformers' native NemotronH built with the same weights, and the choice of native's fastest
experts implementation for a given workload.

Not a module of the package: the scripts import it from their own folder.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Callable

import torch

CONFIGS = {
    # ~30M parameters: hidden 512, 8 layers, 16 experts top-4
    "tiny": dict(
        vocab_size=8192, hidden_size=512, hybrid_override_pattern="MEMEM*EM", num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, mamba_num_heads=16, mamba_head_dim=64, n_groups=4, ssm_state_size=64,
        conv_kernel=4, chunk_size=128, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=1024, intermediate_size=1536, routed_scaling_factor=2.5,
    ),
    # ~300M parameters, Nano-like shape (Nano: hidden 2688, 128 experts top-6, shared expert 1.38 h,
    # Mamba 64 heads x 64, state 128, 8 groups, GQA 32/2 x 128); fewer, narrower experts to fit 300M
    "small": dict(
        vocab_size=16384, hidden_size=1024, hybrid_override_pattern="MEMEM*EMEMEM*EME", num_attention_heads=16,
        num_key_value_heads=2, head_dim=64, mamba_num_heads=32, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
        conv_kernel=4, chunk_size=128, n_routed_experts=32, num_experts_per_tok=6, moe_intermediate_size=384,
        moe_shared_expert_intermediate_size=1408, intermediate_size=2816, routed_scaling_factor=2.5,
    ),
    # ~64M parameters, Super/Ultra-like MoE: LatentMoE (routed experts in a 256-wide latent space), state 128
    "latent": dict(
        vocab_size=16384, hidden_size=768, hybrid_override_pattern="MEM*EMEM", num_attention_heads=12,
        num_key_value_heads=2, head_dim=64, mamba_num_heads=16, mamba_head_dim=64, n_groups=4, ssm_state_size=128,
        conv_kernel=4, chunk_size=128, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=384,
        moe_shared_expert_intermediate_size=1024, intermediate_size=2048, routed_scaling_factor=2.5,
        moe_latent_size=256,
    ),
}
COMMON = dict(initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_mamba_kernels=True)


def build_pair(name: str, seed: int, dtype: torch.dtype, device: str):
    """Our model and the native one with identical weights."""
    from transformers import NemotronHForCausalLM

    from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "modeling_tests"))
    from tiny_configs import native_config

    cfg = Nemotron3Config(**{**COMMON, **CONFIGS[name]})
    torch.manual_seed(seed)
    ours = Nemotron3ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ncfg = native_config(cfg)
    native = NemotronHForCausalLM(ncfg).to(device=device, dtype=dtype).eval()
    state = {k.replace("backbone.", "model.", 1): v for k, v in ours.state_dict().items()}
    missing, unexpected = native.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for m in (ours, native):  # greedy, fixed length, no early stop
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
    return ours, native


def sync(device: str) -> None:
    """Wait for the device (CUDA) so that wall-clock timings cover the work."""
    if device == "cuda":
        torch.cuda.synchronize()


NATIVE_EXPERTS = ("eager", "grouped_mm", "batched_mm")


def pick_fastest_experts(native, measure: Callable[[object], float], label: str = "",
                         candidates: tuple[str, ...] = NATIVE_EXPERTS) -> str:
    """Set and return the fastest of native's experts implementations (``candidates``, by default ``eager``,
    ``grouped_mm`` and ``batched_mm``) for ``measure(native) -> seconds`` (run once untimed, then the best of
    two); an implementation that fails here is reported and skipped."""
    unknown = [c for c in candidates if c not in NATIVE_EXPERTS]
    if unknown or not candidates:
        raise ValueError(f"native experts candidates {list(candidates)}: choose among {list(NATIVE_EXPERTS)}.")
    best, best_t = candidates[0], float("inf")
    for impl in candidates:
        try:
            native.set_experts_implementation(impl)
            measure(native)
            t = min(measure(native) for _ in range(2))
        except Exception as exc:  # noqa: BLE001 - an implementation may not exist on this device
            print(f"  native experts {impl}{label}: unavailable ({type(exc).__name__}: {exc})")
            continue
        print(f"  native experts {impl}{label}: {t * 1e3:.0f} ms")
        if t < best_t:
            best, best_t = impl, t
    native.set_experts_implementation(best)
    return best


def machine_info(device: str) -> dict:
    """Platform, CPU count, library versions and the load average (other jobs disturb CPU timings)."""
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "load_average_at_start": os.getloadavg()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds ``fn()`` takes, the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t
