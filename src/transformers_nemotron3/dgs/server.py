"""The DGS parameter server: global model, per-worker model-difference tracking, sparse replies.

One receiver thread per worker does the blocking point-to-point I/O with that worker and hands
complete messages to the main thread through a queue, so the main thread serves whichever worker
reports first and never blocks on a single peer. A worker whose connection breaks is marked
``dead``; one that stays silent longer than ``worker_timeout`` is marked ``lost`` and no longer
waited for (if it speaks again it gets the full model and rejoins). The main thread alone owns the
model, so the model is always consistent and can be checkpointed at any time.

Downward messages (Yan et al., Sec. 4.2.1): the server remembers, per worker k, the model that
worker currently holds (``have[k]``), picks the top entries of the difference ``theta - have[k]``
per layer and sends the server's *values* at those indices; worker and server then both set those
entries to the same numbers. In exact arithmetic this is the paper's ``theta_k + sparsify(M - v_k)``;
sending values instead of differences keeps worker and server bit-identical (no floating-point drift).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from . import protocol as P
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DGSConfig
from .layout import FlatLayout
from .sparse import decode_sparse, encode_sparse, is_dense, select_topk, topk_count


@dataclass
class ServerResult:
    """What the server reports when the run ends."""

    updates: int
    bytes_up: int
    bytes_down: int
    update_messages: int  # received, including late ones answered with "stop"
    reply_messages: int  # model replies (full or sparse)
    losses: list[tuple[int, int, float]]  # (server update index, worker rank, worker minibatch loss)
    worker_status: dict[int, str]
    updates_per_worker: dict[int, int]
    full_replies: int = 0  # replies that carried the whole model (joins, resyncs, dense mode)
    checkpoint_path: Optional[str] = None
    wall_seconds: float = 0.0
    events: list[str] = field(default_factory=list)

    @property
    def bytes_up_per_update(self) -> float:
        return self.bytes_up / max(1, self.update_messages)

    @property
    def bytes_down_per_update(self) -> float:
        return self.bytes_down / max(1, self.reply_messages)


@dataclass
class _Msg:
    rank: int
    header: Optional[P.Header]
    payload: Optional[torch.Tensor] = None
    error: Optional[BaseException] = None


class DGSServer:
    """Holds the global model for ``workers`` and runs the serving loop (:meth:`run`)."""

    def __init__(self, model: nn.Module, config: DGSConfig, workers: list[int]):
        if not workers:
            raise ValueError("workers is empty; DGS needs at least one worker rank besides the server")
        self.model = model
        self.config = config
        self.workers = sorted(workers)
        self.layout = FlatLayout.from_module(model)
        self.theta = self.layout.gather(model)
        self.step = 0
        if config.resume_from:
            ckpt = load_checkpoint(config.resume_from, model)
            self.theta = self.layout.gather(model)
            self.step = int(ckpt["step"])
        self.up_dense = is_dense(config.ratio)
        self.down_dense = is_dense(config.effective_down_ratio)
        self.up_numel = self.layout.numel if self.up_dense else 2 * topk_count(self.layout, config.ratio)
        self.have: dict[int, Optional[torch.Tensor]] = {k: None for k in self.workers}
        self.status: dict[int, str] = {k: "new" for k in self.workers}
        self.updates_of: dict[int, int] = {k: 0 for k in self.workers}
        self.inbox: "queue.Queue[_Msg]" = queue.Queue()
        self.outbox: dict[int, "queue.Queue"] = {k: queue.Queue() for k in self.workers}
        self.bytes_up = self.bytes_down = self.update_messages = self.reply_messages = self.full_replies = 0
        self.losses: list[tuple[int, int, float]] = []
        self.events: list[str] = []

    # ----------------------------------------------------------------------------- I/O threads
    def _serve_worker(self, k: int) -> None:
        """Receiver thread for worker k: read a message, pass it on, send back the main thread's reply."""
        try:
            while True:
                header = P.recv_header(k, up=True)
                payload = None
                if header.kind == P.UPDATE:
                    dtype = torch.float32 if self.up_dense else torch.int32
                    payload = P.recv_payload(self.up_numel, dtype, k, up=True)
                self.inbox.put(_Msg(k, header, payload))
                if header.kind == P.DONE:
                    return
                reply = self.outbox[k].get()
                if reply is None:  # server shutting down
                    return
                reply_header, reply_payload = reply
                P.send(reply_header, reply_payload, k, up=False)
                if reply_header.kind in (P.STOP, P.REJECT):
                    return
        except BaseException as exc:  # noqa: BLE001 - any failure means this worker is gone
            self.inbox.put(_Msg(k, None, error=exc))

    # ----------------------------------------------------------------------------- model updates
    def _apply(self, payload: torch.Tensor, scale: float = 1.0) -> None:
        if self.up_dense:
            self.theta.sub_(payload if scale == 1.0 else payload * scale)
        else:
            idx, vals = decode_sparse(payload)
            self.theta[idx] = self.theta[idx] - (vals if scale == 1.0 else vals * scale)

    def _reply_model(self, k: int, full: bool = False) -> None:
        """Queue worker k's copy of the model: the full model, or the top of ``theta - have[k]``."""
        resync = self.config.resync_every and self.updates_of[k] and self.updates_of[k] % self.config.resync_every == 0
        if full or self.down_dense or resync or self.have[k] is None:
            payload = self.theta.clone()
            self.have[k] = payload.clone()
            header = P.Header(P.FULL, self.step)
            self.full_replies += 1
        else:
            diff = self.theta - self.have[k]
            idx = select_topk(diff, self.layout, self.config.effective_down_ratio)
            vals = self.theta[idx]
            self.have[k][idx] = vals
            payload = encode_sparse(idx, vals)
            header = P.Header(P.SPARSE, self.step)
        self._queue_reply(k, header, payload)

    def _queue_reply(self, k: int, header: P.Header, payload: Optional[torch.Tensor]) -> None:
        nbytes = P.HEADER_BYTES + (0 if payload is None else payload.numel() * payload.element_size())
        if header.kind in (P.FULL, P.SPARSE):
            self.bytes_down += nbytes
            self.reply_messages += 1
        self.outbox[k].put((header, payload))

    def _count_update(self, msg: _Msg) -> None:
        self.updates_of[msg.rank] += 1
        self.losses.append((self.step, msg.rank, msg.header.value))

    def _log(self, text: str) -> None:
        self.events.append(f"[update {self.step}] {text}")

    # ----------------------------------------------------------------------------- main loop
    def run(self) -> ServerResult:
        """Serve until every worker is done, stopped, dead or lost; then checkpoint and return."""
        cfg = self.config
        start = time.monotonic()
        threads = [threading.Thread(target=self._serve_worker, args=(k,), daemon=True, name=f"dgs-rx-{k}")
                   for k in self.workers]
        for t in threads:
            t.start()
        last_seen = {k: time.monotonic() for k in self.workers}
        pending: dict[int, _Msg] = {}
        rr_next = self.workers[0]
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.total_updates, initial=min(self.step, cfg.total_updates), desc="DGS server",
                       unit="upd", dynamic_ncols=True)
        next_ckpt = (self.step // cfg.checkpoint_every + 1) * cfg.checkpoint_every if cfg.checkpoint_every else None
        live = lambda: [k for k in self.workers if self.status[k] in ("new", "active")]  # noqa: E731

        while live():
            try:
                msg = self.inbox.get(timeout=min(0.1, cfg.worker_timeout))
            except queue.Empty:
                msg = None
            now = time.monotonic()
            before = self.step
            if msg is not None:
                k = msg.rank
                last_seen[k] = now
                self._handle(msg, pending)
            for k in live():
                if k not in pending and now - last_seen[k] > cfg.worker_timeout:
                    self.status[k] = "lost"
                    self._log(f"worker {k} silent for {now - last_seen[k]:.1f} s: marked lost")
            if cfg.mode == "round_robin":
                rr_next = self._serve_round_robin(pending, rr_next)
            elif cfg.mode == "sync":
                self._serve_sync(pending)
            if bar is not None and self.step > before:
                bar.update(min(self.step, cfg.total_updates) - min(before, cfg.total_updates))
            if next_ckpt is not None and self.step >= next_ckpt:
                self.save(cfg.checkpoint_path)
                next_ckpt += cfg.checkpoint_every
        for k, msg in pending.items():  # workers still waiting get a clean stop
            self._queue_reply(k, P.Header(P.STOP, self.step), None)
        for k in self.workers:
            if self.status[k] != "done":
                self.outbox[k].put(None)
        for t in threads:  # threads of stalled or dead workers may stay blocked; they are daemons
            t.join(timeout=0.5 if self.status[int(t.name.rsplit("-", 1)[1])] in ("done", "stopped") else 0.0)
        if bar is not None:
            bar.close()
        self.layout.scatter(self.theta, self.model)
        path = self.save(cfg.checkpoint_path) if cfg.checkpoint_path else None
        return ServerResult(
            updates=self.step, bytes_up=self.bytes_up, bytes_down=self.bytes_down,
            update_messages=self.update_messages, reply_messages=self.reply_messages, losses=self.losses,
            worker_status=dict(self.status), updates_per_worker=dict(self.updates_of),
            full_replies=self.full_replies, checkpoint_path=path,
            wall_seconds=time.monotonic() - start, events=self.events,
        )

    def _handle(self, msg: _Msg, pending: dict[int, _Msg]) -> None:
        k, cfg = msg.rank, self.config
        if msg.error is not None:
            if self.status[k] not in ("done", "stopped"):
                self.status[k] = "dead"
                self._log(f"worker {k} connection failed: {type(msg.error).__name__}: {str(msg.error)[:160]}")
            pending.pop(k, None)
            return
        kind = msg.header.kind
        if kind == P.DONE:
            self.status[k] = "done"
            return
        if kind == P.HELLO:
            if msg.header.aux != self.layout.signature():
                self.status[k] = "dead"
                self._log(f"worker {k} has a different model layout: rejected")
                self._queue_reply(k, P.Header(P.REJECT, self.step), None)
                return
            self.status[k] = "active"
            self._reply_model(k, full=True)
            return
        assert kind == P.UPDATE, kind
        # every update message is counted, also one that arrives too late and is discarded
        self.bytes_up += P.HEADER_BYTES + msg.payload.numel() * msg.payload.element_size()
        self.update_messages += 1
        if self.status[k] == "lost":  # came back after we gave up on it: drop the stale update, resync
            self.status[k] = "active"
            self._log(f"worker {k} is back: dropped its stale update, sent the full model")
            self._reply_model(k, full=True)
            return
        if self.step >= cfg.total_updates:
            self.status[k] = "stopped"
            self._queue_reply(k, P.Header(P.STOP, self.step), None)
            return
        if cfg.mode == "async":
            self._count_update(msg)
            self._apply(msg.payload)
            self.step += 1
            self._reply_model(k)
        else:
            pending[k] = msg

    def _serve_round_robin(self, pending: dict[int, _Msg], rr_next: int) -> int:
        while True:
            live = [k for k in self.workers if self.status[k] in ("new", "active")]
            if not live:
                return rr_next
            k = next((r for r in live if r >= rr_next), live[0])
            if k not in pending:  # also waits for workers that have not joined yet
                return rr_next
            msg = pending.pop(k)
            if self.step >= self.config.total_updates:
                self.status[k] = "stopped"
                self._queue_reply(k, P.Header(P.STOP, self.step), None)
            else:
                self._count_update(msg)
                self._apply(msg.payload)
                self.step += 1
                self._reply_model(k)
            rr_next = k + 1

    def _serve_sync(self, pending: dict[int, _Msg]) -> None:
        live = [k for k in self.workers if self.status[k] in ("new", "active")]
        if not live or not all(k in pending for k in live):
            return
        if self.step >= self.config.total_updates:
            for k in live:
                pending.pop(k)
                self.status[k] = "stopped"
                self._queue_reply(k, P.Header(P.STOP, self.step), None)
            return
        scale = 1.0 / len(live)
        for k in live:
            msg = pending.pop(k)
            self._count_update(msg)
            self._apply(msg.payload, scale)
        self.step += 1
        for k in live:
            self._reply_model(k)

    def save(self, path: str) -> str:
        """Write a consistent checkpoint of the current global model (temp file, then rename)."""
        self.layout.scatter(self.theta, self.model)
        return save_checkpoint(path, self.model, self.step, self.config.describe(), dict(self.status))
