"""A ``transformers`` Trainer callback that switches NVFP4 layers to high precision late in training.

The NVFP4 paper (App. D) recovers most of the loss gap by switching to BF16 shortly before
the learning-rate decay (all tensors), or cheaply at the very end (forward tensors only).
"""

from __future__ import annotations

from typing import Any, Literal

from transformers import TrainerCallback

from .plugin import switch_to_bf16


class NVFP4SwitchToBF16Callback(TrainerCallback):
    """Call :func:`~.plugin.switch_to_bf16` once, at a step or a fraction of ``max_steps``.

    Args:
        at: an ``int`` global step, or a ``float`` in (0, 1) meaning that share of ``max_steps``.
        which: ``"all"``, ``"forward"`` or ``"backward"`` (see :func:`switch_to_bf16`).
    """

    def __init__(self, at: int | float, which: Literal["all", "forward", "backward"] = "all") -> None:
        if isinstance(at, float) and not 0.0 < at < 1.0:
            raise ValueError(f"at={at} as a float must be a fraction in (0, 1) of max_steps; pass an int for a step.")
        if isinstance(at, int) and at < 0:
            raise ValueError(f"at={at} must be a non-negative step.")
        self.at, self.which, self.switched = at, which, False

    def switch_step(self, max_steps: int) -> int:
        """The global step at which the switch happens."""
        return int(self.at * max_steps) if isinstance(self.at, float) else self.at

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self.switched and model is not None and state.global_step >= self.switch_step(state.max_steps):
            switch_to_bf16(getattr(model, "module", model), self.which)
            self.switched = True
