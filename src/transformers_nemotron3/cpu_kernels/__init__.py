"""Optional CPU kernels, as a backend of one model at a time: decode steps (batch 1-16; fp32 and bf16) and, over
whole sequences (training and prefill; fp32, with backward), the Mamba-2 conv + SiLU, the gated and block norms
and squared ReLU.

`enable_cpu_kernels(model)` builds ``decode_kernels.cpp``, ``decode_blocks.cpp`` and ``train_kernels.cpp`` once
per machine with the system C++ compiler (`build`, through ``torch.utils.cpp_extension``, cached under
``~/.cache/torch_extensions``; about 20-35 s the first time) and plugs them into *that model's* seams; other
models in the process keep their PyTorch paths:

- ``model.decode_backend = CpuDecoder()`` (`decoder`): a whole cached decode step in one call (embedding lookup,
  every Mamba-2 / attention / MoE / MLP block, final norm and LM head) where its blocks are covered, and the
  MTP head's blocks while drafting;
- ``model.set_experts_implementation("nemotron3_cpu")`` (`ops`, registered in transformers' experts interface):
  the routed relu^2 experts of a few tokens in one ``moe_relu2`` call;
- each Mamba mixer's ``sequence_mixer`` becomes `ops.CpuMamba2SequenceMixer`: a cached step's conv + SSD update
  in one ``mamba_step`` call, and a whole sequence's conv + SiLU in one ``conv_silu`` pass (`train_ops`);
- each Mamba mixer's gated norm and each block norm get a ``kernel`` (`train_ops.cpu_gated_rms_norm`,
  `train_ops.cpu_rms_norm`), and relu^2 MLPs and experts `train_ops.cpu_relu2`: one pass each way.

The decode kernels run only without autograd, on CPU, in float32 or bfloat16 (bf16 inputs and weights, exact
products and fp32 sums via ``vdpbf16ps`` where the CPU has it); the whole-sequence ones in float32, with or
without autograd (their backward is a kernel too). Plugins keep their own paths (LoRA-wrapped or NVFP4 linears,
expert-parallel dispatchers, context parallelism). Results equal the PyTorch paths up to summation order
(``modeling_tests/test_cpu_kernels.py``, ``test_cpu_decode_step.py``, ``test_cpu_train_kernels.py``). No
parameter, state-dict key or saved file changes: ``save_pretrained`` writes the model files only, and
``_experts_implementation`` is not serialised. With the kernels on, the weights a decode step streams are backed
by transparent huge pages where Linux allows (`hugepages`; ``NEMOTRON3_HUGEPAGES=0`` to skip).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import build
from .decoder import CpuDecoder
from .ops import EXPERTS_IMPLEMENTATION, CpuMamba2SequenceMixer, register_experts_implementation
from .train_ops import cpu_gated_rms_norm, cpu_relu2, cpu_rms_norm

logger = logging.getLogger(__name__)


def _mamba_mixers(model: nn.Module):
    from ..modeling.mamba2 import Nemotron3Mamba2Mixer

    return [m for m in model.modules() if isinstance(m, Nemotron3Mamba2Mixer)]


def _has_experts(model: nn.Module) -> bool:
    from ..modeling.moe import Nemotron3Experts

    return any(isinstance(m, Nemotron3Experts) for m in model.modules())


def _set_whole_sequence_kernels(model: nn.Module, on: bool) -> None:
    """The whole-sequence kernels of `train_ops` into (or out of) this model's norm ``kernel`` seams and relu^2
    activations; a seam some other backend or plugin has set is left alone."""
    from ..modeling.blocks import Nemotron3RMSNorm
    from ..modeling.mamba2 import GatedRMSNorm
    from ..modeling.moe import Nemotron3Experts, Nemotron3MLP, _relu2

    swaps = [(GatedRMSNorm, "kernel", None, cpu_gated_rms_norm), (Nemotron3RMSNorm, "kernel", None, cpu_rms_norm),
             (Nemotron3MLP, "act", _relu2, cpu_relu2), (Nemotron3Experts, "act_fn", _relu2, cpu_relu2)]
    for module in model.modules():
        for cls, name, plain, kernel in swaps:
            if type(module) is cls and getattr(module, name) is (plain if on else kernel):
                if on or plain is not None:
                    setattr(module, name, kernel if on else plain)
                else:
                    delattr(module, name)  # back to the class's None


def enable_cpu_kernels(model: nn.Module, enabled: bool = True) -> bool:
    """Switch the CPU kernels (decode and whole-sequence) on for ``model`` (a `Nemotron3ForCausalLM`, building them
    on first use) or off again; returns whether they are on for it.

    When they cannot be built or used (no C++ compiler, no AVX-512), a warning says why and the model keeps its
    PyTorch paths. Only this model changes; save it as usual (nothing kernel-related is written).
    """
    from ..modeling.mamba2 import Mamba2SequenceMixer
    from ..modeling.modeling_nemotron3 import Nemotron3ForCausalLM

    if not isinstance(model, Nemotron3ForCausalLM):
        raise ValueError(f"enable_cpu_kernels needs a Nemotron3ForCausalLM, got {type(model).__name__}; pass the "
                         "causal LM (its decode hook and experts live there), not the backbone or a wrapper.")
    if not enabled:
        if isinstance(model.decode_backend, CpuDecoder):
            model.decode_backend = None
        for mixer in _mamba_mixers(model):
            if type(mixer.sequence_mixer) is CpuMamba2SequenceMixer:
                mixer.sequence_mixer = Mamba2SequenceMixer()
        _set_whole_sequence_kernels(model, False)
        if model.config._experts_implementation == EXPERTS_IMPLEMENTATION:
            model.set_experts_implementation(getattr(model, "_experts_before_cpu_kernels", None) or "eager")
        return False
    if build.kernel_ops() is None:
        logger.warning("Nemotron 3 CPU kernels unavailable (%s); using the PyTorch paths.", build.unavailable_reason())
        return False
    model.decode_backend = CpuDecoder()
    for mixer in _mamba_mixers(model):  # a plugin's seam (context parallelism) stays in place
        if type(mixer.sequence_mixer) is Mamba2SequenceMixer:
            mixer.sequence_mixer = CpuMamba2SequenceMixer()
    _set_whole_sequence_kernels(model, True)
    if _has_experts(model) and model.config._experts_implementation != EXPERTS_IMPLEMENTATION:
        register_experts_implementation()
        model._experts_before_cpu_kernels = model.config._experts_implementation
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return True


def cpu_kernels_enabled(model: nn.Module) -> bool:
    """Whether `enable_cpu_kernels` switched the kernels on for ``model``."""
    return isinstance(getattr(model, "decode_backend", None), CpuDecoder)


def cpu_kernels_unavailable_reason() -> str:
    """Why the kernels could not be built or used ("" when they could or were not tried)."""
    return build.unavailable_reason()


def main(argv: list[str]) -> int:
    """``nemotron3 cpu-kernels``: build the kernels now (e.g. in a container image) and check one product."""
    import argparse
    import time

    argparse.ArgumentParser(prog="nemotron3 cpu-kernels", description=main.__doc__).parse_args(argv)
    t = time.perf_counter()
    ops = build.kernel_ops()
    if ops is None:
        print(f"CPU kernels unavailable: {build.unavailable_reason()}")
        return 1
    x, w = torch.randn(3, 100), torch.randn(37, 100)
    err = (ops.small_linear(x, w, None) - torch.nn.functional.linear(x, w)).abs().max().item()
    print(f"CPU kernels ready in {time.perf_counter() - t:.1f} s (max |error| vs F.linear {err:.1e}); "
          f"switch them on for a model with enable_cpu_kernels(model)")
    return 0 if err < 1e-4 else 1


__all__ = ["enable_cpu_kernels", "cpu_kernels_enabled", "cpu_kernels_unavailable_reason", "CpuDecoder", "main"]
