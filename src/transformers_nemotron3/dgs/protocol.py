"""Messages between workers and the server over torch.distributed point-to-point.

Every message is a fixed 4 x int64 header ``[kind, step, aux, value_bits]`` followed, for some
kinds, by one payload tensor whose size both sides know from the layout and the ratio
(see :mod:`.sparse`). Headers and payloads use different tags so they can never be confused.
Bytes are counted for everything that goes on the wire, headers included.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

HEADER_LEN = 4
HEADER_BYTES = 8 * HEADER_LEN

# worker -> server
HELLO = 1  # aux = layout signature; reply is FULL (or REJECT)
UPDATE = 2  # payload = sparse or dense velocity entries; value = the worker's minibatch loss
DONE = 3  # the worker has no more data
# server -> worker
FULL = 10  # payload = the whole model (float32 values)
SPARSE = 11  # payload = encode_sparse(indices, model values at those indices)
STOP = 12  # training is over; no payload
REJECT = 13  # the worker's model does not match the server's; no payload

TAG_UP_HEADER, TAG_UP_PAYLOAD, TAG_DOWN_HEADER, TAG_DOWN_PAYLOAD = 101, 102, 103, 104


class DGSTimeoutError(RuntimeError):
    """A peer did not answer within the configured timeout."""


class DGSPeerLostError(RuntimeError):
    """The connection to a peer broke (it crashed or exited)."""


@dataclass
class Header:
    kind: int
    step: int = 0
    aux: int = 0
    value: float = 0.0

    def to_tensor(self) -> torch.Tensor:
        value_bits = torch.tensor([self.value], dtype=torch.float64).view(torch.int64)
        return torch.cat([torch.tensor([self.kind, self.step, self.aux], dtype=torch.int64), value_bits])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Header":
        value = float(t[3:4].clone().view(torch.float64).item())
        return cls(int(t[0]), int(t[1]), int(t[2]), value)


def send(header: Header, payload: Optional[torch.Tensor], dst: int, up: bool) -> int:
    """Send a header and optional payload; returns the bytes put on the wire."""
    tags = (TAG_UP_HEADER, TAG_UP_PAYLOAD) if up else (TAG_DOWN_HEADER, TAG_DOWN_PAYLOAD)
    try:
        dist.send(header.to_tensor(), dst=dst, tag=tags[0])
        nbytes = HEADER_BYTES
        if payload is not None:
            payload = payload.contiguous()
            dist.send(payload, dst=dst, tag=tags[1])
            nbytes += payload.numel() * payload.element_size()
    except RuntimeError as exc:  # gloo reports a dead peer as RuntimeError
        raise DGSPeerLostError(f"sending to rank {dst} failed: {exc}") from exc
    return nbytes


def recv_header(src: int, up: bool, timeout: Optional[float] = None) -> Header:
    """Blocking receive of a header from ``src``.

    With ``timeout`` the wait is bounded; note that on gloo an expired timeout poisons the
    process group, so only a process that gives up afterwards (a worker) should pass one.
    """
    buf = torch.zeros(HEADER_LEN, dtype=torch.int64)
    _recv(buf, src, TAG_UP_HEADER if up else TAG_DOWN_HEADER, timeout)
    return Header.from_tensor(buf)


def recv_payload(numel: int, dtype: torch.dtype, src: int, up: bool, timeout: Optional[float] = None) -> torch.Tensor:
    buf = torch.empty(numel, dtype=dtype)
    _recv(buf, src, TAG_UP_PAYLOAD if up else TAG_DOWN_PAYLOAD, timeout)
    return buf


def _recv(buf: torch.Tensor, src: int, tag: int, timeout: Optional[float]) -> None:
    try:
        work = dist.irecv(buf, src=src, tag=tag)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as exc:
        text = str(exc)
        if "Timed out" in text or "timed out" in text:
            raise DGSTimeoutError(f"no message from rank {src} within {timeout} s: {exc}") from exc
        raise DGSPeerLostError(f"receiving from rank {src} failed: {exc}") from exc
