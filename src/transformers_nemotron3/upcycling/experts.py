"""Virtual-group expert initialisation and weight scaling (He et al. 2024; Megatron-LM upcycling_utils).

Virtual groups. The dense FFN ``down(act(gate x) * up x)`` (or ``down(act(up x))``) is cut into G
shards along its intermediate dimension; shard g keeps rows ``g*I:(g+1)*I`` of up/gate and the same
columns of down, and the shards sum to the dense FFN. Expert e holds shard ``e mod G``; its router row
is random row ``e // G``, so the G experts of a group have identical logits and top-k (with k a
multiple of G) picks whole groups, i.e. one copy of every shard per chosen group.

Output scale. If the chosen weights sum to 1 (``topk_softmax``, or a renormalised sigmoid/softmax), the
T/G chosen groups share weight 1/G in total, so the routed sum is ``dense / G``: the factor to
compensate is f = G, exactly. With un-normalised softmax-then-top-k each weight is about 1/(E*G) at
step 0, the sum is about ``T/(E*G^2) * dense``, so f = E*G^2/T (He et al. Eq. 2), exact only for a
uniform router. An un-normalised sigmoid gives about 1/2 per weight: f = 2G/T (approximate).
A shared expert holding a fraction a of the dense output multiplies the routed factor by (1 - a).

Weight-scaling rules (``UpcyclingConfig.weight_scaling``), applied to each expert:

- ``"auto"``: gated (SwiGLU) experts scale ``up`` and ``down`` by f^(1/2) and leave ``gate`` alone:
  ``down`` and ``up`` enter the output linearly, so this is exact for any gate activation. Non-gated
  experts scale ``up`` and ``down`` by f^(1/p): p = 3 for relu² (homogeneous of degree 2, exact),
  p = 2 for relu (exact) and gelu (approximate).
- ``"paper"``: Megatron-LM literally: every fc1 matrix (gate and up) and fc2 by f^(1/3) for gated or
  relu² experts, f^(1/2) otherwise. Not exact for SwiGLU (silu is not homogeneous).
- ``"router"``: no weight change; f goes into ``routed_scaling_factor`` (one fp32 multiply).
- ``"none"``: no compensation (the naive recipe He et al. found not to converge back).
"""

from __future__ import annotations

import torch

from .config import UpcyclingConfig


def output_factor(cfg: UpcyclingConfig) -> float:
    """f: how much the routed experts must be scaled up so the MoE output matches the dense FFN."""
    e, g, t = cfg.num_experts, cfg.granularity, cfg.top_k
    if cfg.normalized:
        f = float(g)
    elif cfg.router == "softmax":
        f = e * g * g / t
    else:  # un-normalised sigmoid: each chosen weight is about sigmoid(0) = 1/2
        f = 2.0 * g / t
    if cfg.shared_expert:
        f *= 1.0 - cfg.shared_expert_fraction
    return f


def weight_scales(cfg: UpcyclingConfig, gated: bool, act: str) -> dict[str, float]:
    """Per-matrix multipliers ``{"gate", "up", "down"}`` for the chosen rule (1.0 = untouched)."""
    f = output_factor(cfg)
    rule = cfg.weight_scaling
    if rule in ("router", "none") or f == 1.0:
        return {"gate": 1.0, "up": 1.0, "down": 1.0}
    if rule == "paper":
        s = f ** (1.0 / 3.0) if (gated or act == "relu2") else f ** 0.5
        return {"gate": s, "up": s, "down": s}
    if gated:
        s = f**0.5
        return {"gate": 1.0, "up": s, "down": s}
    s = f ** (1.0 / 3.0) if act == "relu2" else f**0.5
    return {"gate": 1.0, "up": s, "down": s}


def router_scaling(cfg: UpcyclingConfig) -> float:
    """``routed_scaling_factor`` of the upcycled config (f under the ``"router"`` rule, else 1)."""
    return output_factor(cfg) if cfg.weight_scaling == "router" else 1.0


def layer_generator(cfg: UpcyclingConfig, layer: int, stream: int) -> torch.Generator:
    """A CPU generator private to (layer, stream): draws do not depend on conversion order."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer * 16 + stream)


def router_weight(cfg: UpcyclingConfig, hidden: int, layer: int) -> torch.Tensor:
    """fp32 router [E*G, hidden]: E random rows (std ``router_init_std``), each repeated G times."""
    rows = torch.randn(cfg.num_experts, hidden, generator=layer_generator(cfg, layer, 0), dtype=torch.float32)
    return (rows * cfg.router_init_std).repeat_interleave(cfg.granularity, dim=0)


def _scaled(w: torch.Tensor, s: float) -> torch.Tensor:
    return w.clone() if s == 1.0 else (w.float() * s).to(w.dtype)


def virtual_group_experts(
    cfg: UpcyclingConfig, layer: int, up: torch.Tensor, down: torch.Tensor, gate: torch.Tensor | None, act: str,
) -> dict[str, torch.Tensor]:
    """Expert tensors ``up_proj`` [E*G, I/G, H], ``down_proj`` [E*G, H, I/G] (and ``gate_proj``).

    ``up``/``gate`` are the dense [I, H] weights, ``down`` is [H, I]; I must be divisible by G.
    """
    g = cfg.granularity
    inter = up.shape[0]
    if inter % g:
        raise ValueError(
            f"granularity={g} does not divide the dense FFN width {inter}; pick G among the divisors of {inter}."
        )
    scales = weight_scales(cfg, gate is not None, act)
    mats = {"up": up, "down": down} if gate is None else {"gate": gate, "up": up, "down": down}
    out: dict[str, torch.Tensor] = {}
    for name, w in mats.items():
        w = _scaled(w, scales[name])
        shards = torch.stack(w.chunk(g, dim=1 if name == "down" else 0))  # [G, ...]
        out[f"{name}_proj"] = shards.repeat(cfg.num_experts, 1, 1).contiguous()  # expert e -> shard e % G
    if cfg.expert_noise > 0 and not up.is_meta:  # meta tensors only plan shapes
        gen = layer_generator(cfg, layer, 1)
        for key, w in out.items():
            std = w.float().std()
            noise = torch.randn(w.shape, generator=gen, dtype=torch.float32) * (cfg.expert_noise * std)
            out[key] = (w.float() + noise).to(w.dtype)
    return out


def shared_expert(cfg: UpcyclingConfig, up: torch.Tensor, down: torch.Tensor, gate: torch.Tensor | None
                  ) -> dict[str, torch.Tensor]:
    """Shared expert = the dense FFN with ``down`` scaled by ``shared_expert_fraction``."""
    out = {"up_proj.weight": up.clone(), "down_proj.weight": _scaled(down, cfg.shared_expert_fraction)}
    if gate is not None:
        out["gate_proj.weight"] = gate.clone()
    return out


__all__ = ["output_factor", "weight_scales", "router_scaling", "router_weight", "virtual_group_experts",
           "shared_expert", "layer_generator"]
