"""Server checkpoints: written to a temporary file next to the target, then atomically renamed."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

FORMAT = "transformers_nemotron3.dgs/1"


def save_checkpoint(path: str, model: nn.Module, step: int, config: dict, workers: dict) -> str:
    """Save ``model``'s state dict with the server's update count; returns ``path``.

    A reader never sees a half-written file: the data goes to ``path + '.tmp-<pid>'`` first and is
    moved over ``path`` with ``os.replace`` (atomic on one filesystem).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    blob = {
        "format": FORMAT,
        "step": int(step),
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": config,
        "workers": {int(k): str(v) for k, v in workers.items()},
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str, model: Optional[nn.Module] = None) -> dict[str, Any]:
    """Read a DGS checkpoint; if ``model`` is given, load the weights into it (strict)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint path {path!r} does not exist; pass the file the DGS server wrote")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a DGS checkpoint (expected format {FORMAT!r})")
    if model is not None:
        model.load_state_dict(blob["model_state_dict"], strict=True)
    return blob
