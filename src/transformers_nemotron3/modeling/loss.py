"""The causal-LM loss: transformers' ``ForCausalLMLoss`` contract, with a cross entropy that keeps no
``[tokens, vocab]`` tensor of its own.

``F.cross_entropy`` writes the log-probabilities (a new ``[tokens, vocab]`` tensor, saved for the backward),
and its backward zero-fills a gradient, scatters into it and exponentiates the log-probabilities again.
`_RowBlockCrossEntropy` runs over blocks of rows small enough to stay in cache: the forward reads the logits
once and keeps one log-sum-exp per row; the backward writes the gradient ``exp(z - lse) w - w onehot`` in one
pass per block. It saves the logits themselves (alive anyway as the model's output), so a step holds one
``[tokens, vocab]`` tensor fewer, and writes one fewer. On the benchmark configs the vocabulary is the largest
tensor of the step. Same value and gradient as ``F.cross_entropy`` up to rounding (tested against
``ForCausalLMLoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BLOCK_ELEMENTS = 1 << 18  # logits per row block (1 MB of float32: the block's temporaries stay in cache)
_MAX_BLOCKS = 256  # at most this many blocks (long inputs take bigger blocks rather than more Python steps)


def _row_blocks(rows: int, vocab: int) -> range:
    size = max(1, _BLOCK_ELEMENTS // max(vocab, 1), -(-rows // _MAX_BLOCKS))
    return range(0, rows, size)


class _RowBlockCrossEntropy(torch.autograd.Function):
    """``sum_t w_t (logsumexp(z_t) - z_t[y_t])`` over rows whose target is not ``ignore_index``, divided by
    ``denominator`` (a tensor; no gradient flows to it). Gradient: ``(softmax(z_t) - onehot(y_t)) w_t / den``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, denominator: torch.Tensor):
        rows, vocab = logits.shape
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)[:, None]
        lse = logits.new_empty(rows)
        blocks = _row_blocks(rows, vocab)
        for start in blocks:
            torch.logsumexp(logits[start : start + blocks.step], dim=-1, out=lse[start : start + blocks.step])
        nll = lse - logits.gather(1, safe)[:, 0]
        loss = torch.where(valid, nll, 0.0).sum() / denominator
        ctx.save_for_backward(logits, lse, safe, valid, denominator)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, lse, safe, valid, denominator = ctx.saved_tensors
        rows, vocab = logits.shape
        weight = torch.where(valid, grad_loss / denominator, 0.0).to(logits.dtype)[:, None]
        grad = torch.empty_like(logits)
        blocks = _row_blocks(rows, vocab)
        for start in blocks:
            end = start + blocks.step
            torch.sub(logits[start:end], lse[start:end, None], out=grad[start:end]).exp_().mul_(weight[start:end])
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
    return _RowBlockCrossEntropy.apply(logits, target, ignore_index, denominator)


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
