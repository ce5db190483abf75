"""The official Nemotron 3 checkpoint layout, as data for transformers' weight-conversion machinery.

Official files (what NVIDIA publishes, vLLM and NVIDIA's tools read, and what we write) name the backbone
``backbone.*``, store one tensor per routed expert (``...mixer.experts.{i}.up_proj.weight``) and the MTP head under
``mtp.*``. In memory the model is named like transformers' native NemotronH: ``model.*`` and fused 3-D expert
parameters (``...mixer.experts.up_proj`` ``[experts, out, in]``).

`OFFICIAL_LAYOUT` says so as a transformers conversion mapping, registered for ``model_type="nemotron3"`` when this
module is imported (also from the remote code saved next to the weights): ``from_pretrained`` applies it while
loading (with every standard option: dtype, device_map, quantization, tp_plan, ...) and ``save_pretrained``
reverses it, so the official layout is what lands on disk. Checkpoints in transformers' own fused layout
(``model.*``, 3-D experts) need no conversion, and older Nemotron-H files naming the embedding
``backbone.embedding.weight`` are renamed on load only.

`official_to_internal` is the same mapping for plain ``load_state_dict`` calls (Trainer's resume and best-model
reload read ``model.safetensors`` that way, without conversion mappings): the model registers it as a
``load_state_dict`` pre-hook.
"""

from __future__ import annotations

import re

import torch
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming

MODEL_TYPE = "nemotron3"
EXPERT_PROJECTIONS = ("up_proj", "down_proj", "gate_proj")  # gate_proj: SwiGLU experts of upcycled models
_EXPERT_KEY = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj|gate_proj)\.weight$")
_FUSED_KEY = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj|gate_proj)$")


class LoadOnlyRenaming(WeightRenaming):
    """A renaming applied when loading and not reversed when saving (legacy spellings are read, never written)."""

    __slots__ = ()

    def reverse_transform(self) -> WeightRenaming:
        identity = WeightRenaming(self._original_target_patterns, self._original_target_patterns)
        identity.scope_prefix, identity.base_model_prefix = self.scope_prefix, self.base_model_prefix
        return identity


def official_layout(read_only: bool = True) -> list:
    """A fresh copy of the conversion mapping (transformers mutates transforms while loading).

    ``read_only=False`` leaves out what a model may never write back: the old Nemotron-H ``embedding.weight``
    spelling, and ``gate_proj`` experts (SwiGLU experts of upcycled models only)."""
    projections = EXPERT_PROJECTIONS if read_only else ("up_proj", "down_proj")
    return [
        WeightRenaming("backbone.", "model."),
        *([LoadOnlyRenaming("embedding.weight", "embeddings.weight")] if read_only else []),
        *[WeightConverter(f"mixer.experts.*.{proj}.weight", f"mixer.experts.{proj}", operations=[MergeModulelist(dim=0)])
          for proj in projections],
    ]


def register_official_layout() -> None:
    """Register `official_layout` for our model type (idempotent)."""
    register_checkpoint_conversion_mapping(MODEL_TYPE, official_layout(), overwrite=True)


def to_internal_key(key: str) -> str:
    """Map a non-expert checkpoint key (official, native transformers or old Nemotron-H) to our parameter name."""
    if key.startswith("backbone."):
        key = "model." + key[len("backbone."):]
    if key == "model.embedding.weight":
        key = "model.embeddings.weight"
    return key


def official_to_internal(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Official keys under ``prefix`` -> our names, per-expert tensors stacked; other keys unchanged.

    Raises ValueError when a stacked expert tensor has gaps (a truncated or mixed checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        local = to_internal_key(key[len(prefix):])
        match = _EXPERT_KEY.match(local)
        if match:
            experts.setdefault(f"{prefix}{match.group(1)}.{match.group(3)}", {})[int(match.group(2))] = value
        else:
            out[prefix + local] = value
    for fused, per_expert in experts.items():
        count = max(per_expert) + 1
        gaps = sorted(set(range(count)) - set(per_expert))
        if gaps:
            raise ValueError(f"The state dict is missing experts {gaps[:10]} of {fused}; it is truncated or mixed.")
        out[fused] = torch.stack([per_expert[i] for i in range(count)])
    return out


def to_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> official keys (``backbone.*``, one tensor per expert), for writers outside transformers
    (the streaming upcycler)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("model."):
            key = "backbone." + key[len("model."):]
        match = _FUSED_KEY.match(key)
        if match:
            for i in range(value.shape[0]):
                out[f"{match.group(1)}.{i}.{match.group(2)}.weight"] = value[i]
        else:
            out[key] = value
    return out


def load_official_state_dict_hook(module, state_dict, prefix, *args, **kwargs) -> None:
    """``load_state_dict`` pre-hook: accept the official layout (what ``save_pretrained`` writes) in place."""
    if not any(k.startswith(prefix + "backbone.") or _EXPERT_KEY.match(k[len(prefix):]) for k in state_dict
               if k.startswith(prefix)):
        return
    converted = official_to_internal({k: state_dict[k] for k in list(state_dict) if k.startswith(prefix)}, prefix)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    state_dict.update(converted)


register_official_layout()

__all__ = ["official_layout", "register_official_layout", "official_to_internal", "to_official_state_dict",
           "to_internal_key", "load_official_state_dict_hook", "LoadOnlyRenaming", "MODEL_TYPE"]
