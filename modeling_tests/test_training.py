"""Training features: gradients, gradient checkpointing, MoE aux losses, bias updates, MTP loss."""

from __future__ import annotations

import torch
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM


def _grads(model, x):
    model.zero_grad()
    out = model(x, labels=x)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_same_gradients():
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).train()
    x = torch.randint(3, 96, (2, 17))
    loss, grads = _grads(model, x)
    model.gradient_checkpointing_enable()
    assert model.backbone.layers[0].gradient_checkpointing
    loss2, grads2 = _grads(model, x)
    assert torch.allclose(loss, loss2)
    assert grads.keys() == grads2.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads2[name], atol=1e-6), name
    # every block type gets gradients: Mamba, attention, MoE experts, router, dense MLP
    for part in ("mixer.A_log", "mixer.q_proj", "experts.up_proj", "gate.weight", "mixer.up_proj", "conv1d"):
        assert any(part in n for n in grads), part


def test_aux_loss_and_router_logits():
    cfg = tiny_config("all_blocks", moe_aux_loss_coef=0.01)
    model = Nemotron3ForCausalLM(cfg).train()
    x = torch.randint(3, 96, (2, 10))
    out = model(x, labels=x, output_router_logits=True)
    assert out.aux_loss is not None and out.aux_loss > 0
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (20, 8)
    model.eval()
    assert model(x, labels=x).aux_loss is None  # aux loss is a training-only term


def test_balance_loss_is_minimal_for_uniform_routing():
    from transformers_nemotron3.modeling.moe import load_balancing_loss

    E, k, T = 8, 2, 64
    uniform = load_balancing_loss(torch.full((T, E), 0.5), torch.arange(T * k).view(T, k) % E, 1, E)
    skewed_idx = torch.tensor([[0, 1]]).expand(T, k)
    skewed_scores = torch.zeros(T, E)
    skewed_scores[:, :2] = 1.0
    skewed = load_balancing_loss(skewed_scores, skewed_idx, 1, E)
    assert abs(uniform.item() - 1.0) < 1e-6 and skewed.item() > 3.9


def test_expert_bias_update_favours_underloaded_experts():
    cfg = tiny_config("all_blocks", moe_bias_update_rate=1e-2)
    model = Nemotron3ForCausalLM(cfg).train()
    x = torch.randint(3, 96, (4, 16))
    model(x)
    router = model.backbone.layers[2].mixer.gate
    load = router.expert_load.clone()
    model.update_expert_bias()
    bias = router.e_score_correction_bias
    assert router.expert_load is None
    assert torch.all(bias[load > load.mean()] < 0) and torch.all(bias[load < load.mean()] > 0)
    # the bias changes which experts are chosen but never the weights' source (unbiased scores)
    model.eval()
    with torch.no_grad():
        h = torch.randn(5, cfg.hidden_size)
        _, scores, weights, idx = router(h)
        assert torch.allclose(weights, scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True) * 2.5)


def test_mtp_loss_trains_the_head():
    cfg = tiny_config("latent_groups_mtp", mtp_num_depths=2)
    model = Nemotron3ForCausalLM(cfg).train()
    x = torch.randint(3, 96, (2, 12))
    out = model(x, labels=x)
    assert out.mtp_loss is not None
    assert torch.allclose(out.loss, out.lm_loss + 0.3 * out.mtp_loss)
    out.loss.backward()
    assert model.mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0
    hidden = out.last_hidden_state.detach()
    draft, _ = model.mtp_draft_logits(hidden[:, :-1], x[:, 1:])
    assert draft.shape == (2, 11, cfg.vocab_size)


def test_loss_decreases_on_cpu():
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(3, 20, (4, 16))
    losses = []
    for _ in range(15):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_router_aux_loss_coef_alias_controls_the_aux_loss():
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).train()
    x = torch.randint(3, 96, (2, 10))
    assert model(x, labels=x).aux_loss is None
    model.config.router_aux_loss_coef = 0.02  # what TRL / Trainer write
    assert model.config.moe_aux_loss_coef == 0.02
    assert model(x, labels=x).aux_loss > 0
