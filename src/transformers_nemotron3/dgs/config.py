"""Settings for a DGS run, validated up front so that a bad value fails before any process starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

Mode = Literal["async", "round_robin", "sync"]
_MODES = ("async", "round_robin", "sync")


@dataclass
class DGSConfig:
    """Everything the server and the workers of one DGS run must agree on.

    Attributes:
        ratio: fraction of each parameter tensor's entries a worker sends per update (top-|u| per
            layer, at least one entry per tensor). ``0.01`` is the paper's top 1 %. ``1.0`` turns
            sparsification off: messages become dense value vectors without indices.
        down_ratio: the same fraction for the server's replies (secondary compression of the
            model difference). ``None`` means "same as ``ratio``"; ``1.0`` sends the full model.
        lr: learning rate eta, folded into the worker's velocity (``u = m*u + eta*grad``).
        lr_lambda: optional schedule; the learning rate used for a step is
            ``lr * lr_lambda(server_step)`` where ``server_step`` is the global update count the
            worker last heard from the server (so all workers follow one schedule).
        momentum: SAMomentum factor m. Sparse runs need ``0 < m < 1`` (unsent entries are divided by m).
        weight_decay: L2 term added to the gradient before the velocity update.
        mode: ``"async"`` serves whichever worker reports first (the DGS setting);
            ``"round_robin"`` serves workers in rank order (deterministic, for tests);
            ``"sync"`` waits for every live worker, applies the mean of their messages and replies
            to all (the synchronous baseline).
        total_updates: the server stops after this many model updates and tells workers to stop.
        resync_every: if > 0, every this many updates of a worker the server sends that worker the
            full model instead of a sparse difference (bounds the staleness of unsent entries).
        worker_timeout: seconds without a message after which the server declares a worker lost
            and stops waiting for it.
        reply_timeout: seconds a worker waits for the server's reply before giving up.
        checkpoint_path: where the server writes its checkpoint (at the end, and every
            ``checkpoint_every`` updates if that is > 0). Written to a temporary file, then renamed.
        checkpoint_every: periodic checkpoint interval in updates (0: only at the end).
        resume_from: a checkpoint written by a previous run; the server starts from its model and
            update count, and every worker joins from that model.
        progress: show a tqdm bar on the server.
    """

    ratio: float = 0.01
    down_ratio: Optional[float] = None
    lr: float = 0.1
    lr_lambda: Optional[Callable[[int], float]] = None
    momentum: float = 0.7
    weight_decay: float = 0.0
    mode: Mode = "async"
    total_updates: int = 1000
    resync_every: int = 0
    worker_timeout: float = 30.0
    reply_timeout: float = 60.0
    checkpoint_path: Optional[str] = None
    checkpoint_every: int = 0
    resume_from: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def effective_down_ratio(self) -> float:
        return self.ratio if self.down_ratio is None else self.down_ratio

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad value and how to fix it."""
        for name in ("ratio", "effective_down_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0 and math.isfinite(value)):
                label = "down_ratio" if name == "effective_down_ratio" else "ratio"
                raise ValueError(
                    f"DGSConfig.{label}={value!r} is not a fraction in (0, 1]; use e.g. 0.01 for the "
                    f"top 1 % per layer, or 1.0 for dense messages"
                )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"DGSConfig.lr={self.lr!r} must be a positive finite number, e.g. 0.1")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"DGSConfig.momentum={self.momentum!r} must be in [0, 1), e.g. 0.7")
        if self.ratio < 1.0 and self.momentum == 0.0:
            raise ValueError(
                f"DGSConfig.momentum=0.0 with ratio={self.ratio}: SAMomentum divides unsent velocity "
                f"entries by the momentum; use a momentum in (0, 1) or ratio=1.0"
            )
        if self.weight_decay < 0:
            raise ValueError(f"DGSConfig.weight_decay={self.weight_decay!r} must be >= 0")
        if self.mode not in _MODES:
            raise ValueError(f"DGSConfig.mode={self.mode!r} is unknown; use one of {_MODES}")
        if not (isinstance(self.total_updates, int) and self.total_updates > 0):
            raise ValueError(f"DGSConfig.total_updates={self.total_updates!r} must be a positive int")
        for name in ("resync_every", "checkpoint_every"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"DGSConfig.{name}={value!r} must be an int >= 0 (0 turns it off)")
        for name in ("worker_timeout", "reply_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"DGSConfig.{name}={value!r} must be a positive number of seconds")
        if self.checkpoint_every and not self.checkpoint_path:
            raise ValueError(
                f"DGSConfig.checkpoint_every={self.checkpoint_every} needs a checkpoint_path to write to"
            )

    def lr_at(self, server_step: int) -> float:
        """Learning rate for a step taken when the worker last heard ``server_step`` from the server."""
        if self.lr_lambda is None:
            return self.lr
        factor = float(self.lr_lambda(server_step))
        if not (factor >= 0 and math.isfinite(factor)):
            raise ValueError(f"lr_lambda({server_step}) returned {factor!r}; it must be a finite number >= 0")
        return self.lr * factor

    def describe(self) -> dict:
        """Plain-data summary (no callables) for checkpoints and JSON reports."""
        return {
            "ratio": self.ratio, "down_ratio": self.effective_down_ratio, "lr": self.lr,
            "lr_schedule": self.lr_lambda is not None, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "mode": self.mode, "total_updates": self.total_updates,
            "resync_every": self.resync_every,
        }
