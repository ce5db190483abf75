"""Worker-side SAMomentum (Yan et al., ICPP 2020, Eq. 14): the velocity is what gets sparsified.

Per step, with momentum m and learning rate eta folded into the velocity u:

    a = m * u + eta * grad                 (the dense momentum step)
    send a[top-k per layer]                (the sent entries are the velocity itself)
    u = a                 where sent
    u = a / m             where not sent   (so the next "m * u" cancels: no momentum decay
                                            while an entry waits, Eq. 15-16)

With ratio 1.0 every entry is sent each step and this is plain heavy-ball momentum SGD
(``u = m*u + eta*g; theta -= u``). There is no separate residual buffer: the unsent part of
the update lives in u.
"""

from __future__ import annotations

from typing import Optional

import torch

from .layout import FlatLayout
from .sparse import is_dense, select_topk


class SAMomentum:
    """Velocity buffer of one worker, producing the (sparse) update it sends to the server."""

    def __init__(self, layout: FlatLayout, momentum: float, ratio: float, weight_decay: float = 0.0):
        if not is_dense(ratio) and not 0.0 < momentum < 1.0:
            raise ValueError(
                f"momentum={momentum!r} with ratio={ratio}: SAMomentum divides unsent entries by the "
                f"momentum, so it must be in (0, 1); or use ratio=1.0"
            )
        self.layout = layout
        self.momentum = float(momentum)
        self.ratio = float(ratio)
        self.weight_decay = float(weight_decay)
        self.velocity = torch.zeros(layout.numel, dtype=torch.float32)

    def reset(self) -> None:
        self.velocity.zero_()

    @torch.no_grad()
    def step(
        self, grad: torch.Tensor, lr: float, params: Optional[torch.Tensor] = None
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Fold one gradient into the velocity and return what to send.

        Returns ``(indices, values)``: int64 indices and float32 values for a sparse step, or
        ``(None, dense_values)`` when the ratio is 1.0. The server subtracts the values from
        its model.
        """
        if self.weight_decay:
            assert params is not None, "weight decay needs the current parameters"
            grad = grad + self.weight_decay * params
        u = self.velocity
        # Two separate ops (not an fused add with alpha) so that ratio 1.0 matches
        # ``u = m * u + lr * g`` bit for bit.
        u.mul_(self.momentum)
        u.add_(grad * lr)
        if is_dense(self.ratio):
            return None, u.clone()
        indices = select_topk(u, self.layout, self.ratio)
        sent = u[indices]
        u.div_(self.momentum)
        u[indices] = sent
        return indices, sent
