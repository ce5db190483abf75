"""A DGS worker: compute a gradient, fold it into SAMomentum, send the top entries, apply the reply."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from . import protocol as P
from .config import DGSConfig
from .layout import FlatLayout
from .samomentum import SAMomentum
from .sparse import decode_sparse, encode_sparse, topk_count

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class WorkerResult:
    """What one worker reports when it stops.

    Byte counts cover model traffic only (update messages up, model replies down, headers
    included); the few 32-byte control headers (hello, done, stop) are not counted.
    """

    steps: int
    losses: list[float]
    bytes_sent: int
    bytes_received: int
    stopped_by_server: bool
    wall_seconds: float = 0.0
    server_steps: list[int] = field(default_factory=list)  # server update count seen after each step


class DGSWorker:
    """Trains ``model`` on ``batches`` against the server at ``server_rank``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, config: DGSConfig, server_rank: int = 0):
        self.model = model
        self.loss_fn = loss_fn
        self.config = config
        self.server_rank = server_rank
        self.layout = FlatLayout.from_module(model)
        self.theta = self.layout.gather(model)
        self.momentum = SAMomentum(self.layout, config.momentum, config.ratio, config.weight_decay)
        self.down_numel = 2 * topk_count(self.layout, config.effective_down_ratio)
        self.server_step = 0
        self.bytes_sent = self.bytes_received = 0

    def _receive_model(self) -> P.Header:
        header = P.recv_header(self.server_rank, up=False, timeout=self.config.reply_timeout)
        if header.kind == P.FULL:
            self.theta = P.recv_payload(self.layout.numel, torch.float32, self.server_rank, up=False,
                                        timeout=self.config.reply_timeout)
            self.bytes_received += P.HEADER_BYTES + 4 * self.layout.numel
        elif header.kind == P.SPARSE:
            wire = P.recv_payload(self.down_numel, torch.int32, self.server_rank, up=False,
                                  timeout=self.config.reply_timeout)
            self.bytes_received += P.HEADER_BYTES + 4 * self.down_numel
            idx, vals = decode_sparse(wire)
            self.theta[idx] = vals
        elif header.kind == P.REJECT:
            raise ValueError(
                "the DGS server rejected this worker: its model has different parameter names or shapes; "
                "build the same architecture on every rank"
            )
        if header.kind in (P.FULL, P.SPARSE):
            self.server_step = header.step
            self.layout.scatter(self.theta, self.model)
        return header

    def join(self) -> None:
        """Say hello and take the server's current model (also how a restarted worker rejoins)."""
        P.send(P.Header(P.HELLO, 0, self.layout.signature()), None, self.server_rank, up=True)
        self._receive_model()
        self.momentum.reset()

    def run(self, batches: Iterable[Any], on_step: Optional[Callable[[int, float], None]] = None) -> WorkerResult:
        """Join, then train until the data ends or the server says stop."""
        start = time.monotonic()
        self.model.train()
        self.join()
        losses: list[float] = []
        server_steps: list[int] = []
        stopped = False
        for batch in batches:
            self.model.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                 f"{getattr(loss, 'shape', '')}; reduce it with .mean()")
            loss.backward()
            loss_value = float(loss.detach())
            grad = self.layout.gather_grads(self.model)
            lr = self.config.lr_at(self.server_step)
            idx, vals = self.momentum.step(grad, lr, params=self.theta)
            payload = vals if idx is None else encode_sparse(idx, vals)
            self.bytes_sent += P.send(P.Header(P.UPDATE, len(losses), 0, loss_value), payload,
                                      self.server_rank, up=True)
            header = self._receive_model()
            if header.kind == P.STOP:
                stopped = True
                break
            losses.append(loss_value)
            server_steps.append(self.server_step)
            if on_step is not None:
                on_step(len(losses), loss_value)
        if not stopped:
            P.send(P.Header(P.DONE), None, self.server_rank, up=True)
        return WorkerResult(len(losses), losses, self.bytes_sent, self.bytes_received, stopped,
                            time.monotonic() - start, server_steps)
