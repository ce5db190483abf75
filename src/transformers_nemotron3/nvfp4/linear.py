"""NVFP4 linear layer: an autograd function running Fprop, Dgrad and Wgrad in NVFP4 emulation.

Master weights, bias, and the returned gradients stay in the parameters' dtype; the three GEMMs
follow :mod:`.gemm`. Autocast is disabled inside so that the emulation is exact whatever the
surrounding mixed-precision context; the output takes the autocast dtype when autocast is on
(as a BF16 ``nn.Linear`` would under ``accelerate`` with ``mixed_precision="bf16"``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .gemm import NVFP4GemmConfig, dgrad, fprop, quantize_weight, wgrad


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class NVFP4LinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with the NVFP4 recipe; see :class:`~.gemm.NVFP4GemmConfig`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        cfg: NVFP4GemmConfig,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        out_dtype = _output_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            reuse = cfg.fprop and cfg.dgrad and cfg.weight_2d
            wq = quantize_weight(weight, cfg) if reuse else None
            y = fprop(x2, weight, cfg, wq)
            if bias is not None:
                y = y + bias.float()
        ctx.save_for_backward(x2, weight, *(wq if wq is not None else ()))
        ctx.cfg, ctx.generator, ctx.has_bias = cfg, generator, bias is not None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):  # type: ignore[override]
        x2, weight, *wq = ctx.saved_tensors
        cfg: NVFP4GemmConfig = ctx.cfg
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            dx = dw = db = None
            if ctx.needs_input_grad[0]:
                dx = dgrad(dy2, weight, cfg, ctx.generator, tuple(wq) if wq else None).reshape(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                dw = wgrad(dy2, x2, cfg, ctx.generator).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy2.float().sum(0).to(weight.dtype)
        return dx, dw, db, None, None


def nvfp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: NVFP4GemmConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Functional NVFP4 linear: like ``F.linear`` with the three GEMMs in NVFP4 emulation."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"nvfp4_linear: input last dimension {x.shape[-1]} does not match weight in_features "
            f"{weight.shape[-1]} (weight shape {tuple(weight.shape)})."
        )
    return NVFP4LinearFunction.apply(x, weight, bias, config or NVFP4GemmConfig(), generator)


class NVFP4Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose GEMMs run in NVFP4 emulation.

    Parameters and state-dict keys are those of ``nn.Linear``; :meth:`from_linear` reuses the
    original parameter objects, so optimizers and checkpoints are unaffected. Set
    ``nvfp4_config`` to change or switch off quantization at any time.
    """

    nvfp4_config: NVFP4GemmConfig

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None, config: NVFP4GemmConfig | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.nvfp4_config = config or NVFP4GemmConfig()
        self.generator: torch.Generator | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: NVFP4GemmConfig | None = None) -> "NVFP4Linear":
        """Wrap an existing ``nn.Linear``, sharing its weight and bias parameters."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}.")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.nvfp4_config = config or NVFP4GemmConfig()
        new.generator = None
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters (undo the conversion)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.nvfp4_config.any_enabled:
            return super().forward(x)
        return NVFP4LinearFunction.apply(x, self.weight, self.bias, self.nvfp4_config, self.generator)

    def extra_repr(self) -> str:
        c = self.nvfp4_config
        on = [n for n in ("fprop", "dgrad", "wgrad") if getattr(c, n)]
        return f"{super().extra_repr()}, nvfp4={'+'.join(on) or 'off'}"
