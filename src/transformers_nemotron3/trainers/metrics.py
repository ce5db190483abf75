"""Logged metrics as global values: over every process, and count-weighted over a logging window.

transformers' ``Trainer`` logs ``loss`` as the mean over all processes (``nested_gather(tr_loss).mean()``)
of the per-step loss, where each step's loss is the token mean over all of its micro-batches and ranks
(the model divides by ``num_items_in_batch``, the token count of the whole step gathered over ranks, and
``compute_loss`` multiplies by the world size so that DDP's gradient mean is exact). TRL's trainers append
extra metrics to ``self._metrics[mode][key]`` lists once per micro-batch and log their plain mean over the
window. The helpers here produce entries for those lists that follow the same conventions, so that:

* ``lm_loss`` / ``mtp_loss`` (token means) and ``aux_loss`` (a per-micro-batch mean) logged from N
  processes equal the values one process logs on the same global batch, and
  ``loss == lm_loss + aux_loss + mtp_loss_scale * mtp_loss`` holds in the log;
* ``env/<name>/share`` is the share of that environment in *all* rows of the window (rows of every rank,
  zero for batches without it), and ``env/<name>/reward`` etc. are means over that environment's rows
  (count-weighted, not a mean of per-batch means).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["COMPONENT_LOSSES", "component_loss_entries", "token_accuracy_entry", "EnvironmentWindow"]

COMPONENT_LOSSES = ("lm_loss", "aux_loss", "mtp_loss")
# lm and MTP losses are normalised by `num_items_in_batch` when the Trainer passes it; the aux loss never is
_TOKEN_NORMALISED = {"lm_loss": True, "aux_loss": False, "mtp_loss": True}


def component_loss_entries(accelerator, outputs, num_items_in_batch=None, average_tokens_across_devices: bool = True,
                           accumulation_steps: int = 1) -> dict[str, float]:
    """One ``_metrics`` entry per component loss present in ``outputs``, global over processes.

    Collective: every rank must call it for every micro-batch (one ``all_gather`` of a few floats).

    * With ``num_items_in_batch`` (the Trainer's token count of the whole optimizer step: all
      ``accumulation_steps`` micro-batches, and all ranks when ``average_tokens_across_devices``), a
      token-normalised loss on one rank is that rank's token sum / the step's count: the sum over ranks (the
      mean, when each rank counted its own tokens) is this micro-batch's part of the step mean, and
      ``accumulation_steps`` times it makes TRL's plain mean over entries the mean over steps.
    * Otherwise (and always for ``aux_loss``) each value is a micro-batch mean: the entry is the mean over ranks.
    """
    present = [name for name in COMPONENT_LOSSES if getattr(outputs, name, None) is not None]
    if not present:
        return {}
    local = torch.stack([getattr(outputs, name).detach().float().reshape(()) for name in present])
    gathered = accelerator.gather(local[None]).reshape(-1, len(present))  # (world, components)
    entries = {}
    for column, name in zip(gathered.unbind(1), present):
        if _TOKEN_NORMALISED[name] and num_items_in_batch is not None:
            step_part = column.sum() if average_tokens_across_devices else column.mean()
            entries[name] = float(step_part) * accumulation_steps
        else:
            entries[name] = float(column.mean())
    return entries


def token_accuracy_entry(accelerator, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 next-token accuracy over the label tokens of every rank (collective). ``labels`` unshifted."""
    with torch.no_grad():
        shifted = labels[:, 1:]
        mask = shifted != -100
        correct = ((logits[:, :-1].argmax(-1) == shifted) & mask).sum()
        counts = accelerator.gather(torch.stack([correct, mask.sum()]).float()[None]).reshape(-1, 2).sum(0)
    return float(counts[0] / counts[1].clamp(min=1))


class EnvironmentWindow:
    """Per-environment row counts and sums over one logging window, summed over processes.

    ``add(accelerator, rows, mode)`` after each generation batch (collective: one ``all_gather``);
    ``pop(mode)`` at logging time returns ``env/<name>/share`` for every environment (rows of it / all rows,
    0 when it was never sampled) and ``env/<name>/{reward,completion_length,turns}`` for the sampled ones
    (means over their rows), then starts a new window.
    """

    FIELDS = ("env_reward", "env_model_tokens", "env_turns")
    LOGGED = ("reward", "completion_length", "turns")

    def __init__(self, names: Iterable[str]) -> None:
        self.names = sorted(names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, accelerator, rows: Sequence[Mapping], mode: str) -> dict[str, int]:
        """Add this rank's ``rows`` (each with ``environment`` and the rollout's ``env_*`` fields); returns the
        global row count per environment of this batch."""
        local = torch.zeros(len(self.names), 1 + len(self.FIELDS), dtype=torch.float64)
        for row in rows:
            name = row["environment"]
            if name not in self._index:
                raise ValueError(f"row environment {name!r} is not one of the trainer's environments {self.names}")
            local[self._index[name], 0] += 1
            for j, field in enumerate(self.FIELDS, start=1):
                local[self._index[name], j] += float(row[field])
        device = accelerator.device
        gathered = accelerator.gather(local.to(device)[None]).reshape(-1, *local.shape).sum(0).cpu()
        self._sums[mode] = self._sums.get(mode, torch.zeros_like(gathered)) + gathered
        return {name: int(gathered[i, 0]) for i, name in enumerate(self.names)}

    def pop(self, mode: str) -> dict[str, float]:
        sums = self._sums.pop(mode, None)
        if sums is None or sums[:, 0].sum() == 0:
            return {}
        total = float(sums[:, 0].sum())
        metrics = {}
        for i, name in enumerate(self.names):
            count = float(sums[i, 0])
            metrics[f"env/{name}/share"] = count / total
            if count:
                for j, key in enumerate(self.LOGGED, start=1):
                    metrics[f"env/{name}/{key}"] = float(sums[i, j]) / count
        return metrics
