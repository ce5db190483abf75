"""Entry points: ``train_dgs`` for any ``nn.Module`` and a helper for Nemotron 3 causal LMs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import DGSConfig
from .server import DGSServer, ServerResult
from .worker import DGSWorker, LossFn, WorkerResult


@dataclass
class DGSResult:
    """Outcome of :func:`train_dgs` in one process: ``server`` on the server rank, ``worker`` elsewhere."""

    rank: int
    role: str
    server: Optional[ServerResult] = None
    worker: Optional[WorkerResult] = None


def train_dgs(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], config: DGSConfig,
              server_rank: int = 0, on_step: Optional[Callable[[int, float], None]] = None) -> DGSResult:
    """Train ``model`` with DGS in the current process group (call it in every process).

    The process with rank ``server_rank`` holds the global model and serves; every other rank is
    a worker that runs ``loss_fn(model, batch)`` over its own ``batches`` (ignored on the server).
    On the server, ``model`` ends up holding the final global weights. The process group must be
    initialised (gloo on CPU; point-to-point send/recv is all DGS needs).
    """
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised; launch with torchrun (or accelerate launch) "
                         "and call dist.init_process_group('gloo') first, or use dgs.launch_local for a local test")
    backend = dist.get_backend()
    if backend != "gloo":
        raise ValueError(f"process group backend {backend!r}: DGS sends CPU tensors point to point and needs "
                         f"'gloo'; call dist.init_process_group('gloo') (a GPU model is fine)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2:
        raise ValueError(f"world size {world}: DGS needs one server rank and at least one worker rank")
    if not 0 <= server_rank < world:
        raise ValueError(f"server_rank={server_rank} is not a rank of this world of size {world}")
    config.validate()
    if rank == server_rank:
        server = DGSServer(model, config, [r for r in range(world) if r != server_rank])
        result = server.run()
        if config.progress:
            print(
                f"DGS server: {result.updates} updates in {result.wall_seconds:.1f} s, "
                f"{result.bytes_up_per_update:.0f} B/update up, {result.bytes_down_per_update:.0f} B/update down, "
                f"workers {result.worker_status}", flush=True,
            )
        return DGSResult(rank, "server", server=result)
    worker = DGSWorker(model, loss_fn, config, server_rank)
    return DGSResult(rank, "worker", worker=worker.run(batches, on_step))


def causal_lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Loss of a Hugging Face causal LM on ``batch``: token ids, or a dict with input_ids (and labels)."""
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch, labels=batch).loss
    if isinstance(batch, dict) and "input_ids" in batch:
        labels = batch.get("labels", batch["input_ids"])
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels).loss
    raise ValueError(f"batch of type {type(batch).__name__} is neither token ids nor a dict with 'input_ids'")


def train_nemotron3_dgs(model: nn.Module, batches: Iterable[Any], config: DGSConfig,
                        server_rank: int = 0) -> DGSResult:
    """Train a ``Nemotron3ForCausalLM`` (or any HF causal LM with ``labels=``) with DGS.

    ``model`` must be float32 (DGS keeps float32 master weights); ``batches`` yields token-id
    tensors of shape (batch, seq) or dicts with ``input_ids``/``labels``.
    """
    return train_dgs(model, causal_lm_loss, batches, config, server_rank)
