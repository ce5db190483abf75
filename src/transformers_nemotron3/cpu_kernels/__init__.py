"""Optional CPU kernels for decode steps (batch 1-16; fp32 and bf16), compiled once on first use.

`enable_cpu_kernels()` builds ``decode_kernels.cpp`` and ``decode_blocks.cpp`` with the system C++
compiler (through ``torch.utils.cpp_extension``, cached under ``~/.cache/torch_extensions``; about
20 s the first time) and plugs them into the model's seams:

- ``decode_step`` (`modeling.fused_decode`): a whole cached decode step in one call, embedding lookup,
  every Mamba-2 / attention / MoE / MLP block, final norm and LM head, for models whose blocks it
  covers (several tokens per sequence while speculative verification records the Mamba states);
- per operation (`modeling.fast_ops`), for every other few-token forward: ``small_linear`` (``x W^T + b``
  for at most 16 rows, streaming each weight row once with a software prefetch; MKL's sgemm packs the
  weight from 4 rows on and runs at a third of the memory bandwidth), ``moe_relu2`` (the routed
  squared-ReLU experts of a few tokens, grouped by expert), ``mamba_step`` (a Mamba-2 decode step between
  ``in_proj`` and ``out_proj``) and ``rms_norm``.

They run only without autograd, on CPU, in float32 or bfloat16 (bf16 inputs and weights, exact products
and fp32 sums via ``vdpbf16ps`` where the CPU has it, outputs rounded to bf16 as PyTorch's bf16 ops
round), with no plugin in the way (LoRA-wrapped or NVFP4 linears, expert-parallel dispatchers and
quantized expert GEMMs keep their own paths). Results equal the PyTorch paths up to summation order
(``modeling_tests/test_cpu_kernels.py``, ``test_cpu_decode_step.py``). Checkpoints are unaffected: the
kernels touch no parameter and no state-dict key. Setting ``NEMOTRON3_CPU_KERNELS=1`` in the environment
switches them on when the package is imported. With them on, the weights a decode step streams are
backed by transparent huge pages where Linux allows (`hugepages`; ``NEMOTRON3_HUGEPAGES=0`` to skip).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from ..modeling import fast_ops

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "decode_kernels.cpp", _HERE / "decode_blocks.cpp"]  # + the headers gemm.h, decode_ops.h
_LOADED: bool | None = None  # None: not tried; False: failed (reason in _REASON)
_REASON = ""


def _build_tag() -> str:
    """A short hash of this CPU's feature flags (the build uses ``-march=native``) and of the sources and
    headers, so that another CPU or changed kernels never pick up a stale build from the cache."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    digest = hashlib.sha1(flags.encode())
    for path in sorted(_HERE.glob("*.cpp")) + sorted(_HERE.glob("*.h")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _load() -> bool:
    global _LOADED, _REASON
    if _LOADED is not None:
        return _LOADED
    try:
        from torch.utils.cpp_extension import load

        logger.info("compiling the Nemotron 3 CPU decode kernels (once per machine, ~20 s)")
        load(
            name=f"nemotron3_cpu_kernels_{_build_tag()}",
            sources=[str(p) for p in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=bool(os.environ.get("NEMOTRON3_CPU_KERNELS_VERBOSE")),
        )
        if not torch.ops.nemotron3_cpu.has_avx512():
            _LOADED, _REASON = False, "this CPU has no AVX-512; the PyTorch paths are faster than the portable kernels"
        else:
            _LOADED = True
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers, ...: fall back to PyTorch
        lines = str(exc).strip().splitlines()
        _LOADED = False
        _REASON = (f"building them failed ({type(exc).__name__}: {lines[-1] if lines else exc}; "
                   "set NEMOTRON3_CPU_KERNELS_VERBOSE=1 to see the compiler output)")
    return _LOADED


def enable_cpu_kernels(enabled: bool = True) -> bool:
    """Switch the CPU decode kernels on (building them on first use) or off; returns whether they are on.

    When they cannot be built or used (no C++ compiler, no AVX-512), a warning says why and the
    model keeps its PyTorch paths. Affects every Nemotron 3 model in this process.
    """
    if not enabled:
        fast_ops.ops = fast_ops.advise_weights = None
        return False
    if not _load():
        logger.warning("Nemotron 3 CPU kernels unavailable (%s); using the PyTorch paths.", _REASON)
        fast_ops.ops = fast_ops.advise_weights = None
        return False
    from . import hugepages

    fast_ops.ops = torch.ops.nemotron3_cpu
    fast_ops.advise_weights = hugepages.advise
    return True


def cpu_kernels_enabled() -> bool:
    """Whether the CPU decode kernels are switched on."""
    return fast_ops.ops is not None


def cpu_kernels_unavailable_reason() -> str:
    """Why `enable_cpu_kernels` could not switch them on ("" when it could or was not tried)."""
    return _REASON


def main(argv: list[str]) -> int:
    """``nemotron3 cpu-kernels``: build the kernels now (e.g. in a container image) and check one product."""
    import argparse
    import time

    argparse.ArgumentParser(prog="nemotron3 cpu-kernels", description=main.__doc__).parse_args(argv)
    t = time.perf_counter()
    if not enable_cpu_kernels():
        print(f"CPU kernels unavailable: {_REASON}")
        return 1
    x, w = torch.randn(3, 100), torch.randn(37, 100)
    err = (torch.ops.nemotron3_cpu.small_linear(x, w, None) - torch.nn.functional.linear(x, w)).abs().max().item()
    print(f"CPU kernels ready in {time.perf_counter() - t:.1f} s (max |error| vs F.linear {err:.1e}); "
          f"switch them on with enable_cpu_kernels() or NEMOTRON3_CPU_KERNELS=1")
    return 0 if err < 1e-4 else 1


__all__ = ["enable_cpu_kernels", "cpu_kernels_enabled", "cpu_kernels_unavailable_reason", "main"]
