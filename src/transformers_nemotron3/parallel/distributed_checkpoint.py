"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP): exact resume of a parallel run.

Every rank writes only what it owns, in parallel, and reads back only its part:

- ``model``: ``get_state_dict(model, optimizer)`` from ``torch.distributed.checkpoint.state_dict``: parameters
  (expert shards as ``Shard(0)`` DTensors, dense tensors replicated, FSDP2 shards as DTensors) and persistent
  buffers, among them every router's ``e_score_correction_bias`` (the aux-loss-free bias);
- ``optim``: the optimizer state under the same fully qualified names (Adam moments of an expert shard are
  DTensors like the shard; ``step`` counters);
- ``rank{r}``: what differs per rank: each router's ``expert_load`` (tokens counted since the last bias
  update: per rank until ``sync_expert_load``), the RNG states (torch CPU / CUDA, Python, NumPy) and
  ``step``;
- any extra ``Stateful`` (an LR scheduler, a dataloader) passed by name.

DCP deduplicates replicated entries (one rank writes each) and reshards DTensors on load, so a run may resume
with another number of processes or another parallel layout: the per-rank router loads are then summed into
rank 0 (the bias update uses only their sum over ranks) and the per-process random states are not restored
(a warning says so). Writes go to a temporary directory next to
``path`` that rank 0 renames into place once every rank has finished (a crash leaves the old checkpoint).
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import logging

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from ..modeling.moe import Nemotron3Router

logger = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _routers(model: nn.Module) -> dict[str, Nemotron3Router]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Nemotron3Router)}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _rank_state(model: nn.Module, step: int | None) -> dict:
    loads = {name: r.expert_load.clone() for name, r in _routers(model).items() if r.expert_load is not None}
    return {"expert_load": loads, "rng": pickle.dumps(_rng_state()),  # one opaque entry per rank
            "step": torch.tensor(-1 if step is None else int(step))}


def save_sharded_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                            step: int | None = None, **stateful) -> None:
    """Write a DCP checkpoint of ``model`` (the bare `Nemotron3ForCausalLM`, sharded in place), ``optimizer``,
    the routers' per-rank ``expert_load``, the RNG states and ``step``; collective (every rank calls)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    state[f"rank{_rank()}"] = _rank_state(model, step)
    state.update(stateful)
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier()


def load_sharded_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                            restore_rng: bool = True, **stateful) -> int | None:
    """Load a checkpoint written by `save_sharded_checkpoint` into the same objects (in place); returns the saved
    ``step`` (None if none was given). Collective. Call with gradients cleared (``zero_grad(set_to_none=True)``):
    an optimizer without state is initialised first so that its moments can be read."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path} is not a sharded checkpoint (no .metadata); pass the directory written by "
                         "save_sharded_checkpoint / Nemotron3Parallel.save_sharded.")
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved_ranks = sorted({int(fqn.split(".", 1)[0][4:]) for fqn in saved
                          if fqn.startswith("rank") and fqn.endswith(".step")})
    world = dist.get_world_size() if dist.is_initialized() else 1
    same_world = saved_ranks == list(range(world))
    # this rank's entry (same world size), or every saved rank's loads and step (another world size)
    readers = [_rank()] if same_world else saved_ranks
    for r in readers:
        key = f"rank{r}"
        prefix = f"{key}.expert_load."  # placeholders for the loads that rank saved (None ones were not)
        entry = {"expert_load": {fqn[len(prefix):]: torch.empty(item.size, dtype=item.properties.dtype)
                                 for fqn, item in saved.items() if fqn.startswith(prefix)},
                 "step": torch.tensor(-1)}
        if same_world:
            entry["rng"] = _rank_state(model, None)["rng"]
        state[key] = entry
    state.update(stateful)
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    for name, router in _routers(model).items():
        loads = [state[f"rank{r}"]["expert_load"][name] for r in readers if name in state[f"rank{r}"]["expert_load"]]
        if not loads:
            router.expert_load = None
        elif same_world:
            router.expert_load = loads[0].clone()
        else:  # the bias update acts on the loads summed over ranks: the sum goes to rank 0, zeros elsewhere
            total = torch.stack(loads).sum(0)
            router.expert_load = total if _rank() == 0 else torch.zeros_like(total)
    key = f"rank{readers[0]}"
    if restore_rng and same_world:
        _set_rng_state(pickle.loads(state[key]["rng"]))
    elif restore_rng:
        logger.warning("%s was written by %d processes and this run has %d: weights, optimizer state, router biases "
                       "and loads are restored, the per-process random states are not.", path, len(saved_ranks), world)
    step = int(state[key]["step"])
    return None if step < 0 else step


__all__ = ["save_sharded_checkpoint", "load_sharded_checkpoint"]
