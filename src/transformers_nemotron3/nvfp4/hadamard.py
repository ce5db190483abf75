"""The 16-point random Hadamard transform (RHT) used on the weight-gradient GEMM inputs.

``M = diag(S) @ H16 / 4`` with ``H16`` the Sylvester Hadamard matrix in natural order and ``S``
one fixed sign vector shared by all layers (Transformer Engine's vector by default). ``M`` is
orthogonal, so rotating both Wgrad operands along their shared (token) dimension leaves
``dY^T X`` unchanged while spreading outliers across each 16-element block before FP4
quantization. Transformer Engine keeps ``M`` in BF16 and rounds the rotated tensor to BF16;
``bf16=True`` reproduces that, ``bf16=False`` keeps everything in FP32.
"""

from __future__ import annotations

import torch

from .format import BLOCK_SIZE

TE_WGRAD_SIGNS: tuple[int, ...] = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
"""Transformer Engine's fixed RHT sign vector (``get_wgrad_sign_vector``)."""


def sylvester_hadamard(n: int = BLOCK_SIZE) -> torch.Tensor:
    """Unnormalised ``n x n`` Sylvester Hadamard matrix (entries +-1), ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}; use 16 for NVFP4.")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def rht_matrix(signs: tuple[int, ...] = TE_WGRAD_SIGNS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthogonal rotation ``diag(signs) @ H / sqrt(len(signs))`` (entries +-1/4 for 16)."""
    n = len(signs)
    if any(s not in (1, -1) for s in signs):
        raise ValueError(f"RHT signs must all be +1 or -1, got {signs}.")
    s = torch.tensor(signs, dtype=torch.float32).unsqueeze(1)
    return (s * sylvester_hadamard(n) / n**0.5).to(dtype)


def random_hadamard_transform(
    x: torch.Tensor, *, signs: tuple[int, ...] = TE_WGRAD_SIGNS, bf16: bool = False
) -> torch.Tensor:
    """Rotate every 16-element tile of the last dimension of ``x`` by :func:`rht_matrix`.

    The last dimension must be a multiple of the transform size (pad with zeros first).
    With ``bf16=True`` the input and matrix are BF16 and the result is rounded to BF16 (then
    returned as FP32), as in Transformer Engine; otherwise the computation is FP32.
    """
    n = len(signs)
    if x.shape[-1] % n:
        raise ValueError(
            f"RHT needs the last dimension to be a multiple of {n}, got shape {tuple(x.shape)}; zero-pad it first."
        )
    m = rht_matrix(signs, torch.float32).to(x.device)
    xf = x.to(torch.bfloat16).float() if bf16 else x.float()
    if bf16:
        m = m.to(torch.bfloat16).float()  # +-1/4 is exact in BF16; kept for clarity
    y = (xf.reshape(*x.shape[:-1], -1, n) @ m).reshape(x.shape)
    return y.to(torch.bfloat16).float() if bf16 else y


def inverse_random_hadamard_transform(y: torch.Tensor, *, signs: tuple[int, ...] = TE_WGRAD_SIGNS) -> torch.Tensor:
    """Undo :func:`random_hadamard_transform` (FP32): multiply each tile by ``M^T``."""
    n = len(signs)
    m = rht_matrix(signs, torch.float32).to(y.device)
    return (y.float().reshape(*y.shape[:-1], -1, n) @ m.T).reshape(y.shape)
