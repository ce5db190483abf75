"""Learning-rate multipliers indexed by the server's global update count (picklable, for spawn)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup over ``warmup`` updates, then cosine decay to ``min_factor`` at ``total``."""

    total: int
    warmup: int = 0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.total <= 0 or not 0 <= self.warmup < self.total:
            raise ValueError(f"WarmupCosine(total={self.total}, warmup={self.warmup}): need 0 <= warmup < total")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepDecay:
    """Multiply by ``gamma`` at each milestone (the paper's "LR / 10 at epochs 30 and 40")."""

    milestones: tuple[int, ...]
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        return self.gamma ** sum(step >= m for m in self.milestones)
