"""Choosing how NVFP4 GEMMs run: exact emulation anywhere, Transformer Engine on SM100+.

Native NVFP4 tensor cores exist on Blackwell only; Transformer Engine trains in NVFP4 on compute
capability 10.x (``NVFP4BlockScaling``). Everywhere else (CPU, Hopper, Ampere) the package
emulates the format exactly and says so once.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Backend = Literal["auto", "emulation", "te"]
_BACKENDS = ("auto", "emulation", "te")
_notice_shown = False


def transformer_engine_unavailable_reason(device: torch.device | None = None) -> str | None:
    """``None`` when Transformer Engine can train in NVFP4 here, else a human-readable reason."""
    if device is not None and device.type != "cuda":
        return f"the model is on {device.type}, not a CUDA GPU"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 10:
        return (f"GPU compute capability {major}.{minor} has no NVFP4 tensor cores "
                "(Transformer Engine NVFP4 training needs SM 10.0/10.3, Blackwell)")
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed (pip install transformer_engine[pytorch])"
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415
        from transformer_engine.common.recipe import NVFP4BlockScaling  # noqa: F401, PLC0415
    except Exception as exc:  # pragma: no cover - depends on the installed TE build
        return f"transformer_engine has no usable NVFP4BlockScaling ({exc}); TE >= 2.8 is needed"
    ok = getattr(te, "is_nvfp4_available", None)
    if ok is not None:
        avail, reason = ok(return_reason=True)
        if not avail:
            return f"transformer_engine reports NVFP4 unavailable: {reason}"
    return None


def select_backend(requested: Backend, device: torch.device | None = None) -> Literal["emulation", "te"]:
    """Resolve ``"auto"`` and check an explicit ``"te"`` request.

    Raises:
        ValueError: unknown backend name, or ``"te"`` requested where TE cannot run NVFP4.
    """
    global _notice_shown
    if requested not in _BACKENDS:
        raise ValueError(f"backend={requested!r} is not one of {_BACKENDS}.")
    if requested == "emulation":
        return "emulation"
    reason = transformer_engine_unavailable_reason(device)
    if requested == "te":
        if reason is not None:
            raise ValueError(f"backend='te' cannot be used: {reason}. Use backend='emulation' or 'auto'.")
        return "te"
    if reason is None:
        return "te"
    if not _notice_shown:
        logger.warning(
            "NVFP4: using exact emulation (quantize -> dequantize -> FP32 GEMM) because %s. "
            "Numerics follow Transformer Engine's NVFP4 recipe (up to GEMM accumulation order); "
            "there is no FP4 speed-up, expect a slowdown versus BF16.", reason,
        )
        _notice_shown = True
    return "emulation"
