"""`UpcyclingConfig`: every choice of a dense -> MoE conversion, validated up front.

Notation of He et al. 2024 ("Upcycling Large Language Models into Mixture of Experts"):
E = expansion (copies of the whole dense FFN), G = granularity (dense FFN width / expert width),
T = top-k. The MoE has E*G routed experts, each 1/G of the dense FFN wide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence, Union

ROUTERS = ("sigmoid", "softmax", "topk_softmax")
WEIGHT_SCALINGS = ("auto", "paper", "router", "none")
MoeLayers = Union[str, int, Sequence[int]]


@dataclass
class UpcyclingConfig:
    """How to turn a dense checkpoint into a Nemotron 3 MoE.

    Attributes:
        num_experts: E, the expansion rate: how many copies of the whole dense FFN the MoE holds.
        granularity: G, how many shards each dense FFN is cut into along its intermediate dimension;
            the MoE has E*G routed experts of width ``intermediate_size / G``.
        top_k: T, experts chosen per token. Must be a multiple of G (the router then picks whole
            virtual groups, each holding one copy of every shard) and at most E*G.
        router: ``"sigmoid"`` (Nemotron 3: sigmoid scores, top-k), ``"softmax"`` (softmax over all
            experts, then top-k; He et al.'s "ST" router) or ``"topk_softmax"`` (top-k of the logits,
            then softmax over the k; Mixtral / "Llama 3 Meets MoE").
        normalize_topk: renormalise the k chosen weights to sum to 1 (``norm_topk_prob``). ``None``
            picks the usual choice: True for sigmoid, False for softmax (the paper's ST router);
            ignored by ``topk_softmax``, which always sums to 1.
        weight_scaling: how the output shrink of the router is compensated (see `experts.py`):
            ``"auto"`` exact-where-possible weight scaling, ``"paper"`` Megatron-LM's rule literally,
            ``"router"`` the factor goes into ``routed_scaling_factor`` (no weight changes), ``"none"``.
        shared_expert: add an always-on shared expert holding ``shared_expert_fraction`` of the dense
            FFN's output; the routed experts carry the rest.
        shared_expert_fraction: in (0, 1); 0.5 keeps the arithmetic exact (a power of two).
        moe_layers: which dense MLP layers become MoE (counted among MLP layers from 0): ``"all"``,
            a list of indices, or an int n for every n-th MLP layer (0, n, 2n, ...). Llama-family
            sources need ``"all"``: Nemotron 3 has no gated dense MLP block to keep the others.
        router_init_std: standard deviation of the random router rows (fp32).
        expert_noise: relative std of Gaussian noise added to each expert's weights to break the
            symmetry between copies; 0 (default) keeps the function exactly.
        aux_loss_coef: load-balancing loss coefficient written into the config (He et al.: 1e-2).
        seed: seed of the router and noise draws; each layer uses its own generator seeded from it,
            so the in-memory and the streaming conversion produce identical bits.
    """

    num_experts: int = 8
    granularity: int = 1
    top_k: int = 2
    router: str = "sigmoid"
    normalize_topk: bool | None = None
    weight_scaling: str = "auto"
    shared_expert: bool = False
    shared_expert_fraction: float = 0.5
    moe_layers: MoeLayers = "all"
    router_init_std: float = 0.02
    expert_noise: float = 0.0
    aux_loss_coef: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def num_routed_experts(self) -> int:
        """E * G."""
        return self.num_experts * self.granularity

    @property
    def normalized(self) -> bool:
        """Whether the chosen top-k weights sum to one (the condition for exact preservation)."""
        if self.router == "topk_softmax":
            return True
        if self.normalize_topk is None:
            return self.router == "sigmoid"
        return bool(self.normalize_topk)

    @property
    def preserves_function(self) -> bool:
        """True when step-0 outputs equal the dense model's up to float rounding (see docs/upcycling.md)."""
        return self.normalized and self.expert_noise == 0.0

    def is_moe_layer(self, mlp_index: int) -> bool:
        """Whether the ``mlp_index``-th dense MLP layer becomes an MoE layer."""
        if self.moe_layers == "all":
            return True
        if isinstance(self.moe_layers, int):
            return mlp_index % self.moe_layers == 0
        return mlp_index in set(self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the bad value and the fix."""
        for name in ("num_experts", "granularity", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}`={value!r} must be a positive integer.")
        n = self.num_routed_experts
        if self.top_k > n:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {n} routed experts (num_experts E={self.num_experts} x "
                f"granularity G={self.granularity}); lower top_k or raise E or G."
            )
        if self.top_k % self.granularity:
            raise ValueError(
                f"top_k={self.top_k} is not a multiple of granularity={self.granularity}; virtual-group "
                "upcycling needs T = k*G so the router picks whole groups (one copy of every shard)."
            )
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is unknown; use one of {ROUTERS}.")
        if self.router == "topk_softmax" and self.top_k == 1:
            raise ValueError("router='topk_softmax' with top_k=1 gives the router no gradient (softmax of one "
                             "value is 1); use top_k >= 2 or another router.")
        if self.weight_scaling not in WEIGHT_SCALINGS:
            raise ValueError(f"weight_scaling={self.weight_scaling!r} is unknown; use one of {WEIGHT_SCALINGS}.")
        if self.shared_expert and not 0.0 < self.shared_expert_fraction < 1.0:
            raise ValueError(f"shared_expert_fraction={self.shared_expert_fraction} must be in (0, 1).")
        if self.router_init_std < 0 or self.expert_noise < 0 or self.aux_loss_coef < 0:
            raise ValueError("router_init_std, expert_noise and aux_loss_coef must be >= 0.")
        layers = self.moe_layers
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"moe_layers={layers!r}; use 'all', an int n (every n-th) or a list of indices.")
        elif isinstance(layers, int) and not isinstance(layers, bool):
            if layers < 1:
                raise ValueError(f"moe_layers={layers} (every n-th MLP layer) must be >= 1.")
        else:
            layers = list(layers)
            if not layers or any(not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"moe_layers={self.moe_layers!r} must be a non-empty list of MLP-layer indices >= 0.")
            self.moe_layers = sorted(set(layers))


__all__ = ["UpcyclingConfig", "ROUTERS", "WEIGHT_SCALINGS"]
