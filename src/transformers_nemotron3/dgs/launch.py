"""Run a function on ``world_size`` local CPU processes joined by a gloo process group.

Used by the tests and the benchmark; for real jobs launch with ``torchrun`` (or
``accelerate launch``) and call :func:`transformers_nemotron3.dgs.train_dgs` in every process.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class RankFailure:
    """A rank that raised (``error`` holds the traceback) or died without reporting (``exitcode``)."""

    rank: int
    error: str = ""
    exitcode: int | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(obj: Any) -> bytes:
    # By value: torch's multiprocessing queue would share tensor memory through the sender, which exits.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any, pg_timeout: float) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        out = fn(rank, world_size, *args)
        results.put((rank, _to_bytes(out)))
    except BaseException:  # noqa: BLE001 - report, never hang the parent
        results.put((rank, _to_bytes(RankFailure(rank, traceback.format_exc()))))
    results.close()
    results.join_thread()
    # Skip process-group teardown: threads blocked on a dead or stalled peer would make it hang.
    os._exit(0)


def launch_local(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 60.0,
                 allow_failures: bool = False, pg_timeout: float = 300.0,
                 start_method: str | None = None) -> dict[int, Any]:
    """Spawn ``fn(rank, world_size, *args)`` on ``world_size`` processes; return ``{rank: result}``.

    ``start_method`` defaults to ``"fork"`` where available (children start in milliseconds and
    inherit imported modules; fine for CPU/gloo as long as the parent has not touched CUDA), else
    ``"spawn"`` (then ``fn`` must be a module-level function). Every process is ended before this
    returns, at the latest after ``timeout`` seconds. A rank that raises or dies shows up as a
    :class:`RankFailure`; unless ``allow_failures`` is set, that raises ``RuntimeError``.
    """
    if world_size < 2:
        raise ValueError(f"world_size={world_size}: DGS needs one server and at least one worker (>= 2)")
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results, pg_timeout), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size and time.monotonic() < deadline:
            try:
                rank, value = results.get(timeout=0.2)
                out[rank] = torch.load(io.BytesIO(value), weights_only=False)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    for r, p in enumerate(procs):
        if r not in out:
            out[r] = RankFailure(r, "no result (killed, crashed or timed out)", p.exitcode)
    failures = [v for v in out.values() if isinstance(v, RankFailure)]
    if failures and not allow_failures:
        raise RuntimeError("DGS ranks failed:\n" + "\n".join(f"rank {f.rank} (exit {f.exitcode}): {f.error}"
                                                              for f in failures))
    return out
