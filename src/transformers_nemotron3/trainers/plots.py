"""Loss and reward curves from a Trainer ``log_history`` (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import os
from typing import Sequence

__all__ = ["plot_history", "series"]


def series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged key, skipping entries without it and NaNs."""
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and value == value and "step" in entry:
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def _plot(history, keys, title, path, ylabel):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = 0
    for key in keys:
        steps, values = series(history, key)
        if steps:
            ax.plot(steps, values, marker="o", markersize=2, label=key)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(history: Sequence[dict], output_dir: str) -> list[str]:
    """Write ``loss.png`` (loss, lm/aux/mtp parts) and ``reward.png`` (mean and per-environment rewards).

    Returns the paths written (a curve with no logged values is skipped).
    """
    os.makedirs(output_dir, exist_ok=True)
    keys = sorted({k for entry in history for k in entry})
    loss_keys = [k for k in ("loss", "lm_loss", "aux_loss", "mtp_loss") if k in keys]
    reward_keys = (["reward"] if "reward" in keys else []) + [
        k for k in keys if k.startswith("env/") and k.endswith("/reward")]
    written = [
        _plot(history, loss_keys, "training loss", os.path.join(output_dir, "loss.png"), "loss"),
        _plot(history, reward_keys, "mean reward", os.path.join(output_dir, "reward.png"), "reward"),
    ]
    return [p for p in written if p]
