"""RMSNorm arithmetic shared by the block norm, the gated Mamba norm and the decode step."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, in fp32 (the result stays fp32).

    The mean of squares comes from one ``vector_norm`` pass: on CPU ``F.rms_norm`` runs as five elementwise
    passes (and costs ~45 us for a single 512-wide row), this form as three; with autograd `_RMSNorm` runs the
    same forward with a hand-written backward. Both equal the op-by-op reference up to fp32 rounding.
    """
    xf = x.float()
    w = weight.float() if weight is not None else None
    if torch.is_grad_enabled() and (xf.requires_grad or (w is not None and w.requires_grad)):
        return _RMSNorm.apply(xf, w, eps)
    inv = _inv_rms(xf, eps)
    out = xf * inv
    return out.mul_(w) if w is not None else out


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last dim, [..., 1], from one ``vector_norm`` pass."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class _RMSNorm(torch.autograd.Function):
    """`rms_norm` for autograd (fp32 ``x``): the forward of the no-grad branch (so training and inference
    forwards agree bit for bit), the backward written out, ``dx = inv (g' - xhat mean(g' xhat))`` with
    ``g' = g w``, ``dw = sum g xhat``: about half the passes of ``F.rms_norm``'s op-by-op autograd on CPU
    (fwd+bwd of a [2, 1024, 1024] norm 21 -> 11 ms). Checked against `F.rms_norm` in test_fast_paths.py."""

    @staticmethod
    def forward(ctx, x, w, eps):
        inv = _inv_rms(x, eps)
        xhat = x * inv
        if w is None:  # the output is xhat itself: keep x (alive upstream anyway) and recompute xhat
            ctx.save_for_backward(x, inv, None)
            ctx.saved_xhat = False
            return xhat
        ctx.save_for_backward(xhat, inv, w)
        ctx.saved_xhat = True
        return xhat * w

    @staticmethod
    def backward(ctx, g):
        saved, inv, w = ctx.saved_tensors
        xhat = saved if ctx.saved_xhat else saved * inv
        gw = None
        if w is not None:
            if ctx.needs_input_grad[1]:
                gw = (g * xhat).reshape(-1, g.shape[-1]).sum(0)
            g = g * w
        gx = None
        if ctx.needs_input_grad[0]:
            mean = torch.linalg.vecdot(g, xhat).div_(g.shape[-1]).unsqueeze(-1)
            gx = torch.addcmul(g, xhat, mean, value=-1).mul_(inv)
        return gx, gw, None


__all__ = ["rms_norm"]
