"""Back the weights a decode step streams with transparent huge pages (Linux).

A batch-1 decode step reads every weight once, and with 4 KB pages that is a TLB miss every 4 KB of
a few-hundred-MB stream. On the 2-core VM of docs/benchmarks.md, collapsing 1 GB of 25 MB matrices
into 2 MB pages took matrix-vector streaming from 22.4 to 26.0 GB/s. `advise` asks the kernel for huge
pages over the 2 MB-aligned interior of each large tensor (``madvise(MADV_HUGEPAGE)``, then
``MADV_COLLAPSE`` to do it now rather than whenever khugepaged gets there; Linux 6.1+, otherwise the
advice alone). Contents and addresses do not change, only the page size behind them. It runs when a
decode plan is built with the CPU kernels on (once per tensor, about 2.5 s per GB the first time);
``NEMOTRON3_HUGEPAGES=0`` switches it off, and where the kernel refuses (THP disabled, no
MADV_COLLAPSE) nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time

import torch

logger = logging.getLogger(__name__)

_HUGE = 2 << 20  # bytes in a transparent huge page on x86-64
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_MIN_BYTES = 4 * _HUGE  # smaller tensors gain little (at most a page or two)
_advised: set[int] = set()  # data pointers already handled
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        try:
            fn = ctypes.CDLL("libc.so.6", use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return _madvise


def enabled() -> bool:
    """Whether `advise` does anything here (Linux, libc found, not switched off by the environment)."""
    return (sys.platform.startswith("linux") and os.environ.get("NEMOTRON3_HUGEPAGES", "1") != "0"
            and bool(_libc_madvise()))


def advise(tensors) -> int:
    """Ask for huge pages behind each large CPU tensor in ``tensors`` (None entries skipped); returns bytes advised."""
    if not enabled():
        return 0
    madvise = _libc_madvise()
    start, total = time.perf_counter(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        size = t.numel() * t.element_size()
        ptr = t.data_ptr()
        if size < _MIN_BYTES or ptr in _advised:
            continue
        _advised.add(ptr)
        lo = (ptr + _HUGE - 1) // _HUGE * _HUGE
        hi = (ptr + size) // _HUGE * _HUGE
        if hi - lo < _HUGE:
            continue
        if madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0:
            madvise(lo, hi - lo, _MADV_COLLAPSE)  # may fail (older kernel, no free huge pages): advice stands
            total += hi - lo
    if total:
        logger.info("huge pages requested for %.0f MB of decode weights (%.1f s)", total / 1e6,
                    time.perf_counter() - start)
    return total


__all__ = ["advise", "enabled"]
