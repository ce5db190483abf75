"""NVFP4 grouped expert GEMM (the experts' ``gemm(x, weight, counts)`` seam) vs references."""

from __future__ import annotations

import pytest
import torch

from transformers_nemotron3.nvfp4 import (
    NVFP4GemmConfig,
    NVFP4GroupedGemm,
    grouped_mm_reference,
    nvfp4_grouped_mm,
    nvfp4_linear,
)

NO_SR = NVFP4GemmConfig(stochastic_rounding=False)


def _data(counts, d_in=48, d_out=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(counts)
    return (torch.randn(t, d_in, generator=g), torch.randn(len(counts), d_out, d_in, generator=g),
            torch.tensor(counts, dtype=torch.int64), torch.randn(t, d_out, generator=g))


def test_plain_reference_is_a_loop_of_matmuls():
    x, w, counts, _ = _data([3, 0, 5, 8])
    out = grouped_mm_reference(x, w, counts)
    starts = [0, 3, 3, 8]
    for e, (s, n) in enumerate(zip(starts, counts.tolist())):
        assert torch.allclose(out[s:s + n], x[s:s + n] @ w[e].T)


@pytest.mark.parametrize("counts", [[16, 16, 32], [5, 0, 19, 1]])
def test_grouped_equals_one_nvfp4_linear_per_expert_forward_and_backward(counts):
    """Each expert is exactly an NVFP4 linear layer with its own global scales."""
    x, w, c, dy = _data(counts, seed=len(counts))
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = nvfp4_grouped_mm(xg, wg, c, NO_SR)
    out.backward(dy)
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    pieces = []
    for xe, we, n in zip(torch.split(xl, counts), wl, counts):
        if n:
            pieces.append(nvfp4_linear(xe, we, None, NO_SR))
    ref = torch.cat(pieces)
    ref.backward(dy)
    assert torch.equal(out, ref)
    assert torch.equal(xg.grad, xl.grad)
    assert torch.equal(wg.grad[[i for i, n in enumerate(counts) if n]], wl.grad[[i for i, n in enumerate(counts) if n]])
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.equal(wg.grad[e], torch.zeros_like(w[e]))  # an idle expert gets a zero gradient


def test_grouped_is_close_to_plain_reference():
    x, w, c, dy = _data([64, 40, 24], d_in=64, d_out=64, seed=3)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = NVFP4GroupedGemm()(xg, wg, c)
    out.backward(dy)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = grouped_mm_reference(xr, wr, c)
    ref.backward(dy)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    errs = rel(out, ref), rel(xg.grad, xr.grad), rel(wg.grad, wr.grad)
    assert errs[0] < 0.2 and errs[1] < 0.25 and errs[2] < 0.25, errs
    assert min(errs) > 0.02, errs


def test_disabled_config_falls_back_to_reference():
    x, w, c, _ = _data([4, 12])
    gemm = NVFP4GroupedGemm(NVFP4GemmConfig().with_bf16("all"))
    assert torch.equal(gemm(x, w, c), grouped_mm_reference(x, w, c))


def test_autocast_output_dtype():
    x, w, c, _ = _data([8, 8])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = NVFP4GroupedGemm(NO_SR)(x, w, c)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda x, w, c: (x, w[0], c), r"\[E, out, in\]"),
        (lambda x, w, c: (x, w, c[:1]), "one entry per expert"),
        (lambda x, w, c: (x[:, :5], w, c), "must be \\[T, 48\\]"),
        (lambda x, w, c: (x, w, c + 1), "counts sum to"),
    ],
)
def test_bad_inputs_raise_value_error(bad, match):
    x, w, c, _ = _data([4, 12])
    with pytest.raises(ValueError, match=match):
        NVFP4GroupedGemm()(*bad(x, w, c))
