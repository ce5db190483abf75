"""One-call NVFP4 conversion of a built model, for use before ``accelerator.prepare``.

Accelerate has no FP4 mixed-precision mode and dispatches recipe handlers by exact class, so
NVFP4 is applied to the model itself and Accelerate (or the HF ``Trainer``) runs with
``mixed_precision="bf16"``::

    model = Nemotron3ForCausalLM(config)
    prepare_nvfp4(model)                      # Nemotron 3 Super recipe, backend chosen here
    accelerator = Accelerator(mixed_precision="bf16")
    model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))

Conversion keeps every parameter object and state-dict key: selected ``nn.Linear`` become
:class:`~.linear.NVFP4Linear` (emulation) or ``transformer_engine.pytorch.Linear`` (TE), and the
selected experts modules get an NVFP4 ``gemm``. :func:`switch_to_bf16` undoes the numerics for
the end of training.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn as nn

from .backend import Backend, select_backend
from .grouped import NVFP4GroupedGemm
from .linear import NVFP4Linear
from .recipe import LayerDecision, NVFP4Recipe, plan_nvfp4


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prepare_nvfp4(model: nn.Module, recipe: NVFP4Recipe | None = None, *, backend: Backend = "auto") -> nn.Module:
    """Convert ``model`` in place for NVFP4 training and return it.

    Args:
        model: a built model (e.g. ``Nemotron3ForCausalLM``), before ``accelerator.prepare``.
        recipe: module selection and GEMM settings; the Nemotron 3 Super recipe by default.
        backend: ``"auto"`` (Transformer Engine on an SM100+ GPU with TE installed, else
            emulation with a one-time message), ``"emulation"`` or ``"te"``.

    The decisions are stored as ``model.nvfp4_plan`` (a list of :class:`LayerDecision`).

    Raises:
        ValueError: the model was already prepared, or the backend cannot run here.
    """
    if getattr(model, "nvfp4_plan", None) is not None:
        raise ValueError("prepare_nvfp4: this model was already converted (model.nvfp4_plan is set); call it once.")
    recipe = recipe or NVFP4Recipe()
    chosen = select_backend(backend, _device_of(model))
    plan = plan_nvfp4(model, recipe)
    if chosen == "te":
        _convert_te(model, plan, recipe)
    for d in plan:
        if d.precision != "nvfp4":
            continue
        mod = model.get_submodule(d.name)
        if d.kind == "linear" and chosen == "emulation":
            _set_submodule(model, d.name, NVFP4Linear.from_linear(mod, recipe.gemm))
        elif d.kind == "experts":
            # Experts use the emulated grouped GEMM on every backend (no TE grouped path here).
            mod.gemm = NVFP4GroupedGemm(recipe.gemm, fallback=mod.gemm)
    model.nvfp4_plan = plan
    model.nvfp4_backend = chosen
    return model


def _convert_te(model: nn.Module, plan: list[LayerDecision], recipe: NVFP4Recipe) -> None:  # pragma: no cover - needs SM100
    """Swap selected linears for ``te.Linear`` and run the forward under NVFP4 autocast."""
    import transformer_engine.pytorch as te  # noqa: PLC0415
    from transformer_engine.common.recipe import NVFP4BlockScaling  # noqa: PLC0415

    cfg = recipe.gemm
    te_recipe = NVFP4BlockScaling(
        disable_rht=not cfg.wgrad_rht,
        disable_stochastic_rounding=not cfg.stochastic_rounding,
        disable_2d_quantization=not cfg.weight_2d,
    )
    for d in plan:
        if d.kind != "linear" or d.precision != "nvfp4":
            continue
        lin = model.get_submodule(d.name)
        if lin.in_features % 16 or lin.out_features % 16:
            _set_submodule(model, d.name, NVFP4Linear.from_linear(lin, cfg))  # TE needs dims % 16
            continue
        new = te.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                        params_dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        _set_submodule(model, d.name, new)
    autocast = getattr(te, "autocast", None)
    inner = model.forward
    model.nvfp4_te_enabled = True

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        enabled = model.training and model.nvfp4_te_enabled
        if autocast is not None:
            with autocast(enabled=enabled, recipe=te_recipe):
                return inner(*args, **kwargs)
        with te.fp8_autocast(enabled=enabled, fp8_recipe=te_recipe):
            return inner(*args, **kwargs)

    model.forward = forward


def switch_to_bf16(model: nn.Module, which: Literal["all", "forward", "backward"] = "all") -> int:
    """Return NVFP4 GEMMs of a prepared model to high precision (end-of-training switch).

    ``which="forward"`` switches Fprop only (the paper's cheaper partial recovery),
    ``"backward"`` Dgrad and Wgrad only. Returns the number of modules changed.

    Raises:
        ValueError: the model was not prepared, or a partial switch was asked of the TE backend.
    """
    if getattr(model, "nvfp4_plan", None) is None:
        raise ValueError("switch_to_bf16: the model was not converted with prepare_nvfp4.")
    if getattr(model, "nvfp4_backend", "emulation") == "te":
        if which != "all":
            raise ValueError(f"switch_to_bf16(which={which!r}) needs the emulation backend; TE switches 'all' only.")
        model.nvfp4_te_enabled = False
    changed = 0
    for mod in model.modules():
        if isinstance(mod, NVFP4Linear):
            mod.nvfp4_config = mod.nvfp4_config.with_bf16(which)
            changed += 1
        elif isinstance(getattr(mod, "gemm", None), NVFP4GroupedGemm):
            mod.gemm.config = mod.gemm.config.with_bf16(which)
            changed += 1
    return changed


def nvfp4_summary(model: nn.Module) -> str:
    """A table (one line per module) of the precision each GEMM module runs in, and why."""
    plan = getattr(model, "nvfp4_plan", None)
    if plan is None:
        raise ValueError("nvfp4_summary: the model was not converted with prepare_nvfp4.")
    width = max((len(d.name) for d in plan), default=4)
    lines = [f"{'module':<{width}}  {'kind':<9}  precision  reason"]
    lines += [f"{d.name:<{width}}  {d.kind:<9}  {d.precision:<9}  {d.reason}" for d in plan]
    n_q = sum(d.precision == "nvfp4" for d in plan if d.kind in ("linear", "experts"))
    n_all = sum(d.kind in ("linear", "experts") for d in plan)
    lines.append(f"{n_q}/{n_all} linear/expert modules in NVFP4 (backend: {getattr(model, 'nvfp4_backend', '?')})")
    return "\n".join(lines)
