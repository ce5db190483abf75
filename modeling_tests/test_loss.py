"""The model's default causal-LM loss equals transformers' ``ForCausalLMLoss`` (value and gradient), and the
model keeps transformers' ways of choosing another loss."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_configs import tiny_config
from transformers.loss.loss_utils import ForCausalLMLoss

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.modeling.loss import causal_lm_loss


def _logits_and_labels(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 17, 50, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 50, (3, 17), generator=gen)
    labels[0, :5] = -100
    labels[2, 9] = -100
    # a row whose target probability underflows float32 (log p would be -inf)
    logits[1, 3] = torch.where(torch.arange(50) == labels[1, 4], -300.0, 5.0).to(dtype)
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": 37}, {"num_items_in_batch": torch.tensor(29)},
                                    {"ignore_index": 7}, {"shift": True}])
def test_loss_equals_transformers_causal_lm_loss(dtype, kwargs):
    logits, labels = _logits_and_labels(dtype)
    kwargs = dict(kwargs)
    if "ignore_index" in kwargs:
        labels = labels.masked_fill(labels == -100, kwargs["ignore_index"])
    if kwargs.pop("shift", False):
        kwargs["shift_labels"] = torch.roll(labels, -2, dims=1)
        labels = None
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    ours = causal_lm_loss(ours_in, labels, 50, **kwargs)
    ref = ForCausalLMLoss(ref_in, labels, 50, **kwargs)
    assert math.isfinite(ours.item())
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    g = torch.rand(())
    (ours * g).backward()
    (ref * g).backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-7)


def test_underflowing_target_probability_gives_the_exact_loss():
    logits = torch.full((1, 2, 10), 5.0)
    logits[0, 0, 3] = -300.0  # p(target) = exp(-305) / 9 ~ 1e-133: zero in float32
    loss = causal_lm_loss(logits, torch.tensor([[0, 3]]), 10)
    assert abs(loss.item() - (305.0 + math.log(9.0))) < 1e-3


def test_all_ignored_is_nan_as_in_transformers():
    logits = torch.randn(1, 4, 10)
    labels = torch.full((1, 4), -100)
    assert math.isnan(causal_lm_loss(logits, labels, 10).item())
    assert math.isnan(ForCausalLMLoss(logits, labels, 10).item())


def test_model_uses_it_by_default_and_keeps_transformers_overrides():
    model = Nemotron3ForCausalLM(tiny_config("all_blocks"))
    ids = torch.randint(3, 96, (2, 9))
    assert model.loss_function is causal_lm_loss
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, ids, model.config.vocab_size) + out.aux_loss
                               if out.aux_loss is not None else ForCausalLMLoss(out.logits, ids, 96))

    calls = []

    def custom(logits, labels, vocab_size, **kwargs):
        calls.append(kwargs)
        return logits.sum() * 0 + 42.0

    model.loss_function = custom  # transformers' setter: a loss set on the model wins
    assert model(ids, labels=ids).lm_loss.item() == 42.0 and calls
    del model._loss_function
    model.loss_type = "ForMaskedLM"  # another loss type goes through transformers' LOSS_MAPPING
    from transformers.loss.loss_utils import LOSS_MAPPING

    assert model.loss_function is LOSS_MAPPING["ForMaskedLM"]
