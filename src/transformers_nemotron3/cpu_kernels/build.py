"""Build and load the CPU kernels (``torch.ops.nemotron3_cpu``) once per process; nothing here touches a model."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "decode_kernels.cpp", _HERE / "decode_blocks.cpp", _HERE / "train_kernels.cpp"]  # + headers
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


def kernel_ops():
    """``torch.ops.nemotron3_cpu`` once built and usable on this CPU, else None (`unavailable_reason` says why).
    Every user of the kernels looks them up here at call time (tests put a call-recording stand-in here)."""
    return torch.ops.nemotron3_cpu if _load() else None


def unavailable_reason() -> str:
    """Why the kernels could not be built or used ("" when they could or were not tried)."""
    return _REASON
