"""Upcycling: turn a dense checkpoint into a Nemotron 3 MoE that reproduces it at step 0.

Public API:

- `UpcyclingConfig`: E (expansion), G (granularity), T (top-k), router kind, scaling rule, shared
  expert, which layers, router init, expert noise (see `config.py`).
- `upcycle(dense_model_or_path, config) -> Nemotron3ForCausalLM`: in memory.
- `upcycle_to_disk(src, dst, config)`: streaming, layer by layer, into official-layout safetensors
  (the ``nemotron3 upcycle`` command).
- `Nemotron3ForCausalLM.from_dense(dense_model_or_path, config=None, **fields)`: attached to the model
  class when this package is imported (the model files stay free of upcycling code).

Recipes and which settings preserve the function exactly: docs/upcycling.md.
"""

from __future__ import annotations

from typing import Any

from ..modeling import Nemotron3ForCausalLM
from .config import UpcyclingConfig
from .convert import build_target_config, iter_upcycled, upcycle
from .experts import output_factor, weight_scales
from .sources import DenseSource
from .stream import upcycle_to_disk


def _from_dense(cls, dense_model_or_path: Any, config: UpcyclingConfig | None = None, **fields: Any):
    """Upcycle a dense model or checkpoint directory into this class (see `transformers_nemotron3.upcycling.upcycle`).

    Example: ``Nemotron3ForCausalLM.from_dense("llama-dir", num_experts=8, granularity=1, top_k=2)``.
    """
    model = upcycle(dense_model_or_path, config, **fields)
    if cls is not type(model):
        raise ValueError(f"from_dense builds Nemotron3ForCausalLM, not {cls.__name__}.")
    return model


Nemotron3ForCausalLM.from_dense = classmethod(_from_dense)

__all__ = ["UpcyclingConfig", "upcycle", "upcycle_to_disk", "DenseSource", "build_target_config", "iter_upcycled",
           "output_factor", "weight_scales"]
