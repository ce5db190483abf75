"""Per-layer top-k selection and the sparse wire format (indices + values) with byte accounting.

A sparse message carries ``k`` entries as one int32 tensor ``[indices (int32) | values (float32
bits viewed as int32)]``: 8 bytes per entry, indices included. A dense message carries the
``n`` float32 values only: 4 bytes per entry. ``k`` per layer is fixed by the layout and the
ratio, so the receiver always knows the payload size in advance.
"""

from __future__ import annotations

import torch

from .layout import FlatLayout

BYTES_PER_SPARSE_ENTRY = 8  # int32 index + float32 value
BYTES_PER_DENSE_ENTRY = 4  # float32 value


def layer_k(numel: int, ratio: float) -> int:
    """Entries a layer of ``numel`` elements sends at ``ratio`` (at least 1, at most numel)."""
    return min(numel, max(1, int(round(numel * ratio))))


def topk_count(layout: FlatLayout, ratio: float) -> int:
    """Total entries in one sparse message for this layout and ratio."""
    return sum(layer_k(n, ratio) for n in layout.numels)


def is_dense(ratio: float) -> bool:
    return ratio >= 1.0


def select_topk(flat: torch.Tensor, layout: FlatLayout, ratio: float) -> torch.Tensor:
    """Indices (int64, into ``flat``) of the ``ratio`` largest-magnitude entries of every layer."""
    chosen = []
    for offset, n in zip(layout.offsets, layout.numels):
        k = layer_k(n, ratio)
        segment = flat[offset:offset + n]
        if k == n:
            local = torch.arange(n)
        else:
            local = torch.topk(segment.abs(), k, sorted=False).indices
        chosen.append(local + offset)
    return torch.cat(chosen)


def encode_sparse(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Pack indices and float32 values into one int32 wire tensor of length ``2k``."""
    assert indices.numel() == values.numel()
    return torch.cat([indices.to(torch.int32), values.to(torch.float32).contiguous().view(torch.int32)])


def decode_sparse(wire: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_sparse`: (int64 indices, float32 values)."""
    k = wire.numel() // 2
    return wire[:k].to(torch.int64), wire[k:].contiguous().view(torch.float32)


def payload_bytes(layout: FlatLayout, ratio: float) -> int:
    """Bytes of one message body (header excluded) at ``ratio`` for this layout."""
    if is_dense(ratio):
        return BYTES_PER_DENSE_ENTRY * layout.numel
    return BYTES_PER_SPARSE_ENTRY * topk_count(layout, ratio)
