"""A model's trainable parameters seen as one flat float32 vector, split into per-tensor layers."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and offsets of a module's trainable parameters inside one flat vector.

    DGS selects the top entries *per layer* (per parameter tensor), so the layout keeps the
    segment boundaries. Flat vectors always live on the CPU (the gloo transport sends CPU tensors);
    ``scatter`` copies them to wherever the module's parameters are. Server and workers build the layout from the same architecture, so the
    indices in a sparse message mean the same thing on both sides.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]

    @classmethod
    def from_module(cls, module: nn.Module) -> "FlatLayout":
        names, shapes, offsets, numels = [], [], [], []
        offset = 0
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if param.dtype != torch.float32:
                raise ValueError(
                    f"parameter {name!r} has dtype {param.dtype}; DGS keeps float32 weights on the wire "
                    f"and on the server, call model.float() first"
                )
            names.append(name)
            shapes.append(tuple(param.shape))
            offsets.append(offset)
            numels.append(param.numel())
            offset += param.numel()
        if not names:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to train")
        return cls(tuple(names), tuple(shapes), tuple(offsets), tuple(numels))

    @property
    def numel(self) -> int:
        return self.offsets[-1] + self.numels[-1]

    def signature(self) -> int:
        """A small integer fingerprint of the layout, exchanged at join time to catch mismatched models."""
        return zlib.crc32(repr((self.names, self.shapes)).encode()) & 0x7FFFFFFF

    def parameters(self, module: nn.Module) -> list[nn.Parameter]:
        named = dict(module.named_parameters())
        return [named[name] for name in self.names]

    def gather(self, module: nn.Module) -> torch.Tensor:
        """The module's parameter values as a new flat float32 vector."""
        return torch.cat([p.detach().reshape(-1).cpu() for p in self.parameters(module)]).to(torch.float32)

    def gather_grads(self, module: nn.Module) -> torch.Tensor:
        """The module's gradients as a flat vector (zeros where a parameter got no gradient)."""
        parts = []
        for p in self.parameters(module):
            parts.append(torch.zeros(p.numel()) if p.grad is None else p.grad.detach().reshape(-1).float().cpu())
        return torch.cat(parts)

    @torch.no_grad()
    def scatter(self, flat: torch.Tensor, module: nn.Module) -> None:
        """Copy a flat vector into the module's parameters (in place, keeping their storage)."""
        assert flat.numel() == self.numel, (flat.numel(), self.numel)
        for p, offset, n in zip(self.parameters(module), self.offsets, self.numels):
            p.copy_(flat[offset:offset + n].view(p.shape))

    def state_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter tensors (cloned) from a flat vector, keyed by parameter name."""
        return {
            name: flat[offset:offset + n].view(shape).clone()
            for name, shape, offset, n in zip(self.names, self.shapes, self.offsets, self.numels)
        }
