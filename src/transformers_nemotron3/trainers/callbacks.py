"""Trainer callbacks for Nemotron 3: expert-bias updates, frozen-router checks, loss/reward history."""

from __future__ import annotations

import json
import os
import warnings

import torch
import torch.distributed as dist
from transformers import TrainerCallback

__all__ = ["ExpertBiasUpdateCallback", "RouterFreezeCallback", "HistoryCallback", "router_modules"]


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def router_modules(model) -> list[torch.nn.Module]:
    """Every MoE router (a module named ``...mixer.gate`` with ``e_score_correction_bias``)."""
    return [m for name, m in _unwrap(model).named_modules()
            if name.endswith("mixer.gate") and hasattr(m, "e_score_correction_bias")]


class ExpertBiasUpdateCallback(TrainerCallback):
    """Aux-loss-free balancing: after every optimizer step, call ``model.update_expert_bias(rate)``.

    The model counts expert loads over the training forwards since the previous call (all micro-batches of
    the step), so one call per optimizer step is the DeepSeek-V3 / Nemotron 3 recipe. With several
    data-parallel processes (``sync_loads``, on by default) the loads are first summed over all of them, so
    every rank makes the update one process would make on the global batch (and the ranks stay identical).
    The expert-parallel trainers sum them themselves (``ExpertLoadSyncCallback``) and pass ``sync_loads=False``.
    """

    def __init__(self, rate: float | None = None, sync_loads: bool = True) -> None:
        self.rate = rate
        self.sync_loads = sync_loads
        self.updates = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model)
        if hasattr(model, "update_expert_bias"):
            if self.sync_loads and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for module in model.modules():  # same order on every rank
                    if getattr(module, "expert_load", None) is not None:
                        dist.all_reduce(module.expert_load)
            model.update_expert_bias(self.rate)
            self.updates += 1
        return control


class RouterFreezeCallback(TrainerCallback):
    """Keeps routers frozen: checks at every step end that router weights and correction biases did not move."""

    def __init__(self, model) -> None:
        self.snapshot = {id(m): (m.weight.detach().clone(), m.e_score_correction_bias.detach().clone())
                         for m in router_modules(model)}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for m in router_modules(model):
            weight, bias = self.snapshot[id(m)]
            assert torch.equal(m.weight.detach(), weight), "a frozen router weight changed during training"
            assert torch.equal(m.e_score_correction_bias, bias), "a frozen router correction bias changed"
        return control


class HistoryCallback(TrainerCallback):
    """Writes ``state.log_history`` as JSON (and, with ``plot=True``, loss/reward PNGs) when training ends.

    Only the main process writes (every rank holds the same, global, history). When nothing was logged to
    plot (``logging_steps`` larger than the steps run) it warns instead of silently writing no figure.
    """

    def __init__(self, output_dir: str, plot: bool = True) -> None:
        self.output_dir = output_dir
        self.plot = plot

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "log_history.json"), "w") as f:
            json.dump(state.log_history, f, indent=1)
        if self.plot:
            from .plots import plot_history

            if not plot_history(state.log_history, self.output_dir):
                warnings.warn(f"HistoryCallback: no loss or reward was logged in {state.global_step} steps "
                              f"(logging_steps={args.logging_steps}), so no plot was written; lower logging_steps")
        return control
