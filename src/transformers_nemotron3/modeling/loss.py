"""The causal-LM loss: transformers' ``ForCausalLMLoss`` contract, with a cross entropy that runs one exp pass.

``F.cross_entropy`` stores the log-probabilities and its backward exponentiates them again (and zero-fills a
``[tokens, vocab]`` gradient before scattering into it); `_SoftmaxCrossEntropy` stores the probabilities
instead, so the backward is one multiply. On the benchmark configs the vocabulary is the largest tensor of the
step and this halves the loss's share of it. Same memory as ``F.cross_entropy`` (one ``[tokens, vocab]`` float32
tensor saved), same value and gradient up to rounding (tested against ``ForCausalLMLoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# p(target) below this: the loss is taken from an exact logsumexp of the row instead of log(p)
_TINY_PROB = 1e-30


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """``sum_t w_t (logsumexp(z_t) - z_t[y_t])`` over rows whose target is not ``ignore_index``, divided by
    ``denominator`` (a tensor; no gradient flows to it). Gradient: ``(softmax(z_t) - onehot(y_t)) w_t / den``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, denominator: torch.Tensor):
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)[:, None]
        probs = torch.softmax(logits, dim=-1)
        p_target = probs.gather(1, safe)[:, 0]
        nll = -torch.log(p_target)
        small = valid & (p_target < _TINY_PROB)
        if small.any():  # log(p) has underflowed or lost its digits: exact logsumexp for those rows
            rows = small.nonzero()[:, 0]
            nll[rows] = torch.logsumexp(logits[rows], dim=-1) - logits[rows].gather(1, safe[rows])[:, 0]
        loss = torch.where(valid, nll, 0.0).sum() / denominator
        ctx.save_for_backward(probs, safe, valid, denominator)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, safe, valid, denominator = ctx.saved_tensors
        weight = torch.where(valid, grad_loss / denominator, 0.0).to(probs.dtype)[:, None]
        grad = probs * weight
        grad.scatter_add_(1, safe, -weight)
        return grad, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None,
                  ignore_index: int = -100) -> torch.Tensor:
    """transformers' ``fixed_cross_entropy`` on ``[tokens, vocab]`` logits: the sum over non-ignored tokens divided
    by ``num_items_in_batch`` when given, else their mean (nan without any, as ``F.cross_entropy``)."""
    if num_items_in_batch is None:
        denominator = (target != ignore_index).sum().to(logits.dtype)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=logits.device).to(logits.dtype)
    return _SoftmaxCrossEntropy.apply(logits, target, ignore_index, denominator)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``ForCausalLMLoss`` (transformers.loss.loss_utils), argument for argument: float32 logits, labels shifted
    left by one (or ``shift_labels`` as given), `cross_entropy` over every position."""
    logits = logits.float()
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                         num_items_in_batch, ignore_index)


__all__ = ["causal_lm_loss", "cross_entropy"]
