"""NVFP4 training for Nemotron 3: the number format, quantized GEMMs, the recipe, the plugin.

Quick use (before ``accelerator.prepare``; run Accelerate with ``mixed_precision="bf16"``)::

    from transformers_nemotron3.nvfp4 import prepare_nvfp4, nvfp4_summary
    prepare_nvfp4(model)            # Nemotron 3 Super layer table, published GEMM recipe
    print(nvfp4_summary(model))

Layers:

- :mod:`.format`   E2M1 / E4M3 elements, RNE and stochastic rounding, nibble packing.
- :mod:`.quantize` scales in Transformer Engine's order, :class:`NVFP4Tensor`.
- :mod:`.hadamard` the 16-point random Hadamard transform.
- :mod:`.gemm`     Fprop / Dgrad / Wgrad emulation, :class:`NVFP4GemmConfig`.
- :mod:`.linear`   :class:`NVFP4Linear` and its autograd function.
- :mod:`.grouped`  the MoE experts' grouped GEMM (``experts.gemm`` seam).
- :mod:`.recipe`   which modules stay in high precision, :class:`NVFP4Recipe`.
- :mod:`.backend`  emulation vs Transformer Engine ``NVFP4BlockScaling``.
- :mod:`.plugin`   :func:`prepare_nvfp4`, :func:`switch_to_bf16`, :func:`nvfp4_summary`.
- :mod:`.callback` :class:`NVFP4SwitchToBF16Callback` for the HF Trainer (imported lazily).
"""

from .backend import select_backend, transformer_engine_unavailable_reason
from .format import (
    BLOCK_SIZE,
    E2M1_MAX,
    E2M1_VALUES,
    E4M3_MAX,
    e2m1_decode,
    e2m1_encode_rne,
    e2m1_encode_stochastic,
    e2m1_round_rne,
    e2m1_round_stochastic,
    e4m3_saturating_cast,
    pack_nibbles,
    unpack_nibbles,
)
from .gemm import NVFP4GemmConfig, nvfp4_matmul_nt
from .grouped import NVFP4GroupedGemm, grouped_mm_reference, nvfp4_grouped_mm
from .hadamard import TE_WGRAD_SIGNS, inverse_random_hadamard_transform, random_hadamard_transform, rht_matrix
from .linear import NVFP4Linear, NVFP4LinearFunction, nvfp4_linear
from .plugin import nvfp4_summary, prepare_nvfp4, switch_to_bf16
from .quantize import NVFP4Tensor, fake_quantize, global_encode_scale, quantize_dequantize
from .recipe import SUPER_BF16_PATTERNS, LayerDecision, NVFP4Recipe, plan_nvfp4


def __getattr__(name: str):
    if name == "NVFP4SwitchToBF16Callback":  # needs transformers.TrainerCallback; import on demand
        from .callback import NVFP4SwitchToBF16Callback

        return NVFP4SwitchToBF16Callback
    raise AttributeError(name)


__all__ = [
    "BLOCK_SIZE", "E2M1_MAX", "E2M1_VALUES", "E4M3_MAX", "SUPER_BF16_PATTERNS", "TE_WGRAD_SIGNS",
    "LayerDecision", "NVFP4GemmConfig", "NVFP4GroupedGemm", "NVFP4Linear", "NVFP4LinearFunction",
    "NVFP4Recipe", "NVFP4SwitchToBF16Callback", "NVFP4Tensor",
    "e2m1_decode", "e2m1_encode_rne", "e2m1_encode_stochastic", "e2m1_round_rne", "e2m1_round_stochastic",
    "e4m3_saturating_cast", "fake_quantize",
    "global_encode_scale", "grouped_mm_reference", "inverse_random_hadamard_transform",
    "nvfp4_grouped_mm", "nvfp4_linear", "nvfp4_matmul_nt", "nvfp4_summary", "pack_nibbles",
    "plan_nvfp4", "prepare_nvfp4", "quantize_dequantize", "random_hadamard_transform", "rht_matrix",
    "select_backend", "switch_to_bf16", "transformer_engine_unavailable_reason", "unpack_nibbles",
]
