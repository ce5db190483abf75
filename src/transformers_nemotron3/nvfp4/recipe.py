"""Which modules of a Nemotron 3 model train in NVFP4 and which stay in high precision.

The default follows the Nemotron 3 Super pretraining table (arXiv 2604.12374, Table 3): every
linear layer in NVFP4 except the final 15 % of the layers, the LatentMoE latent projections,
the MTP layers, the attention projections, the embeddings and the output head. The router
(``mixer.gate``) is not a linear layer and is never quantized. Super runs the Mamba output
projection in MXFP8; this package has no MXFP8 path, so ``mamba_out_proj`` chooses between
BF16 (the safe default) and NVFP4.

Names are matched with shell-style globs (``fnmatch``) against ``model.named_modules()``
names, which follow transformers' NemotronH (``model.layers.{i}.mixer.in_proj`` ...).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

import torch.nn as nn

from .gemm import NVFP4GemmConfig

SUPER_BF16_PATTERNS: tuple[str, ...] = (
    "mtp.*",
    "*.mtp.*",
    "*embeddings*",
    "lm_head",
    "*.mixer.q_proj",
    "*.mixer.k_proj",
    "*.mixer.v_proj",
    "*.mixer.o_proj",
    "*.mixer.fc1_latent_proj",
    "*.mixer.fc2_latent_proj",
    "*.mixer.gate",
)
"""Module-name globs kept in high precision by the Nemotron 3 Super recipe."""

MAMBA_OUT_PROJ_PATTERN = "*.mixer.out_proj"

_LAYER_INDEX = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.")

Precision = Literal["nvfp4", "bf16"]


@dataclass(frozen=True)
class LayerDecision:
    """One row of an NVFP4 plan: a module, what it is, the precision chosen and why."""

    name: str
    kind: Literal["linear", "experts", "embedding", "router"]
    precision: Precision
    reason: str


@dataclass(frozen=True)
class NVFP4Recipe:
    """Module selection plus GEMM settings for NVFP4 training.

    Attributes:
        gemm: recipe parts for every quantized GEMM (defaults: the published recipe).
        bf16_last_fraction: share of the decoder layers, counted from the end, kept in high
            precision (``ceil(fraction * num_layers)`` layers; 0.15 of 88 gives 14, as the
            Megatron-Bridge Super recipe).
        bf16_first_layers: number of leading decoder layers kept in high precision.
        bf16_patterns: module-name globs kept in high precision.
        mamba_out_proj: ``"bf16"`` or ``"nvfp4"`` for the Mamba output projection.
        quantize_experts: run the routed experts' grouped GEMM in NVFP4.
    """

    gemm: NVFP4GemmConfig = field(default_factory=NVFP4GemmConfig)
    bf16_last_fraction: float = 0.15
    bf16_first_layers: int = 0
    bf16_patterns: tuple[str, ...] = SUPER_BF16_PATTERNS
    mamba_out_proj: Precision = "bf16"
    quantize_experts: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.bf16_last_fraction < 1.0:
            raise ValueError(
                f"bf16_last_fraction={self.bf16_last_fraction} must be in [0, 1); 0.15 is the Super recipe."
            )
        if self.bf16_first_layers < 0:
            raise ValueError(f"bf16_first_layers={self.bf16_first_layers} must be >= 0.")
        if self.mamba_out_proj not in ("bf16", "nvfp4"):
            raise ValueError(
                f"mamba_out_proj={self.mamba_out_proj!r} is not supported; use 'bf16' (closest to the "
                "Super recipe's MXFP8, which this package does not emulate) or 'nvfp4'."
            )
        if isinstance(self.bf16_patterns, str):
            raise ValueError(f"bf16_patterns must be a tuple of globs, got the string {self.bf16_patterns!r}; wrap it in a tuple.")

    def bf16_layers(self, num_layers: int) -> set[int]:
        """Indices of decoder layers kept entirely in high precision."""
        last = math.ceil(self.bf16_last_fraction * num_layers - 1e-9)
        first = min(self.bf16_first_layers, num_layers)
        return set(range(first)) | set(range(num_layers - last, num_layers))

    def decide(self, name: str, num_layers: int) -> tuple[Precision, str]:
        """Precision and reason for a GEMM module called ``name`` in a model of ``num_layers``."""
        for pat in self.bf16_patterns:
            if fnmatchcase(name, pat):
                return "bf16", f"matches {pat!r}"
        m = _LAYER_INDEX.search(name)
        if m is not None and int(m.group(1)) in self.bf16_layers(num_layers):
            return "bf16", f"layer {m.group(1)} is in the high-precision first/last layers"
        if self.mamba_out_proj == "bf16" and fnmatchcase(name, MAMBA_OUT_PROJ_PATTERN):
            return "bf16", "Mamba out_proj (Super uses MXFP8; mamba_out_proj='bf16')"
        return "nvfp4", "default"


def is_grouped_experts(module: nn.Module) -> bool:
    """True for a routed-experts module offering the ``gemm`` seam with 3-D expert weights."""
    up = getattr(module, "up_proj", None)
    return callable(getattr(module, "gemm", None)) and isinstance(up, nn.Parameter) and up.dim() == 3


def _num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if isinstance(n, int):
        return n
    found = [int(m.group(1)) for name, _ in model.named_modules() if (m := _LAYER_INDEX.search(name + "."))]
    return max(found) + 1 if found else 0


def plan_nvfp4(model: nn.Module, recipe: NVFP4Recipe | None = None) -> list[LayerDecision]:
    """Decide, without changing anything, the precision of every GEMM-bearing module.

    Lists linear layers, grouped-experts modules, embeddings and routers in
    ``named_modules`` order. Embeddings and routers are always high precision.
    """
    recipe = recipe or NVFP4Recipe()
    n = _num_layers(model)
    plan: list[LayerDecision] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            plan.append(LayerDecision(name, "embedding", "bf16", "embeddings are never quantized"))
        elif isinstance(mod, nn.Linear):
            plan.append(LayerDecision(name, "linear", *recipe.decide(name, n)))
        elif is_grouped_experts(mod):
            prec, why = recipe.decide(name, n)
            if prec == "nvfp4" and not recipe.quantize_experts:
                prec, why = "bf16", "quantize_experts=False"
            plan.append(LayerDecision(name, "experts", prec, why))
        elif name.endswith("mixer.gate") and isinstance(getattr(mod, "weight", None), nn.Parameter):
            plan.append(LayerDecision(name, "router", "bf16", "the router is never quantized"))
    return plan
