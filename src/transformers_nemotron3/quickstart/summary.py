"""The end of a run: the summary table, ``summary.json``, the model folder's ``training_summary.json`` and the
overview plot ``curves.png`` (per-stage curves are in ``<out>/<stage>/loss.png`` / ``reward.png``)."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict

import torch

__all__ = ["summary_table", "write_summary", "write_training_summary", "plot_curves"]

CURVES = (  # (stage, logged keys, y label)
    ("pretrain", ("loss",), "loss"),
    ("continue", ("loss",), "loss (LM + scaled MTP)"),
    ("sft", ("loss", "lm_loss", "mtp_loss"), "loss"),
    ("grpo", ("reward", "env/*/reward"), "reward"),
)


def summary_table(results) -> str:
    """One row per stage: status, wall and CPU seconds, and what it showed (or why it failed)."""
    rows = [("stage", "status", "wall s", "cpu s", "result")]
    for r in results:
        rows.append((r.name, r.status, f"{r.seconds:.1f}", f"{r.cpu_seconds:.1f}", r.message))
    total_wall = sum(r.seconds for r in results)
    total_cpu = sum(r.cpu_seconds for r in results)
    rows.append(("total", "", f"{total_wall:.1f}", f"{total_cpu:.1f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
        if n == 0 or n == len(rows) - 2:
            lines.append("-" * min(120, sum(widths) + 8 + max(len(r[4]) for r in rows)))
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _payload(ctx) -> dict:
    return {
        "command": "nemotron3 quickstart", "size": ctx.size_name,
        "seed": ctx.seed, "nvfp4": ctx.nvfp4, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "stages": [_jsonable(asdict(r)) for r in ctx.results],
    }


def write_summary(ctx) -> str:
    """``<out>/summary.json``; returns its path."""
    path = os.path.join(ctx.out, "summary.json")
    with open(path, "w") as f:
        json.dump(_payload(ctx), f, indent=1)
    return path


def write_training_summary(ctx) -> str | None:
    """``training_summary.json`` in the saved model folder (read by ``nemotron3 publish`` for the model card).

    Schema (the same as ``summary.json``): ``command``, ``size``, ``seed``, ``nvfp4``, ``torch``, ``threads``,
    ``machine`` and ``stages``, a list in run order of ``{name, status, metrics, message, seconds, cpu_seconds,
    raised}``; ``metrics`` holds the stage's numbers (``loss_before`` / ``loss_after`` for training stages,
    ``reward_before/<env>`` / ``reward_after/<env>`` for GRPO, ``acceptance_length`` and ``tokens_per_s_*`` for
    generation, ``max_logit_diff`` for upcycle and reload). Written when the model is saved and again at the end.
    """
    if ctx.saved is None:
        return None
    path = os.path.join(ctx.saved, "training_summary.json")
    with open(path, "w") as f:
        json.dump(_payload(ctx), f, indent=1)
    return path


def plot_curves(ctx) -> str | None:
    """``<out>/curves.png``: one panel per training stage that logged anything; None when none did."""
    from fnmatch import fnmatchcase

    from ..trainers.plots import series

    panels = []
    for stage, keys, ylabel in CURVES:
        path = os.path.join(ctx.out, stage, "log_history.json")
        if os.path.exists(path):
            with open(path) as f:
                history = json.load(f)
            logged = sorted({k for h in history for k in h})
            names = [k for key in keys for k in logged if k == key or ("*" in key and fnmatchcase(k, key))]
            lines = [(name, *series(history, name)) for name in names]
            lines = [line for line in lines if line[1]]
            if lines:
                panels.append((stage, ylabel, lines))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (stage, ylabel, lines) in zip(axes[0], panels):
        for name, steps, values in lines:
            ax.plot(steps, values, marker="o", markersize=2, label=name)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(ctx.out, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
