"""NVFP4 recipe + plugin on the tiny Nemotron 3 models: which layers stay BF16, conversion, switches."""

from __future__ import annotations

import logging
import types

import pytest
import torch
import torch.nn as nn
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.nvfp4 import (
    NVFP4GroupedGemm,
    NVFP4Linear,
    NVFP4Recipe,
    NVFP4SwitchToBF16Callback,
    nvfp4_summary,
    plan_nvfp4,
    prepare_nvfp4,
    switch_to_bf16,
)
from transformers_nemotron3.nvfp4 import backend as nvfp4_backend


def _model(name: str = "all_blocks") -> Nemotron3ForCausalLM:
    torch.manual_seed(0)
    return Nemotron3ForCausalLM(tiny_config(name)).eval()


def _gemm_names(plan, precision):
    return [d.name for d in plan if d.kind in ("linear", "experts") and d.precision == precision]


def test_all_blocks_model_bf16_layers_are_exactly_the_recipe_ones():
    # layers: 0 mamba, 1 attention, 2 moe, 3 mlp, 4 mamba, 5 moe (ceil(0.15*6) = 1 last layer)
    plan = plan_nvfp4(_model())
    assert _gemm_names(plan, "bf16") == [
        "model.layers.0.mixer.out_proj",                       # Mamba out_proj (MXFP8 in Super)
        "model.layers.1.mixer.q_proj", "model.layers.1.mixer.k_proj",
        "model.layers.1.mixer.v_proj", "model.layers.1.mixer.o_proj",  # attention
        "model.layers.4.mixer.out_proj",
        "model.layers.5.mixer.experts",                        # final 15 % of layers
        "model.layers.5.mixer.shared_experts.up_proj", "model.layers.5.mixer.shared_experts.down_proj",
        "lm_head",
    ]
    assert _gemm_names(plan, "nvfp4") == [
        "model.layers.0.mixer.in_proj",
        "model.layers.2.mixer.experts",
        "model.layers.2.mixer.shared_experts.up_proj", "model.layers.2.mixer.shared_experts.down_proj",
        "model.layers.3.mixer.up_proj", "model.layers.3.mixer.down_proj",
        "model.layers.4.mixer.in_proj",
    ]
    kinds = {d.name: (d.kind, d.precision) for d in plan}
    assert kinds["model.embeddings"] == ("embedding", "bf16")
    assert kinds["model.layers.2.mixer.gate"] == ("router", "bf16")


def test_super_style_model_keeps_latent_projections_and_mtp_in_bf16():
    plan = plan_nvfp4(_model("latent_groups_mtp"))
    nvfp4 = _gemm_names(plan, "nvfp4")
    assert nvfp4 == [
        "model.layers.0.mixer.in_proj",
        "model.layers.1.mixer.experts",
        "model.layers.1.mixer.shared_experts.up_proj", "model.layers.1.mixer.shared_experts.down_proj",
    ]
    bf16 = _gemm_names(plan, "bf16")
    assert "model.layers.1.mixer.fc1_latent_proj" in bf16 and "model.layers.1.mixer.fc2_latent_proj" in bf16
    assert all(n in bf16 for n in _gemm_names(plan, "bf16") if n.startswith("mtp."))
    assert any(n.startswith("mtp.") for n in bf16)


def test_recipe_layer_cut_matches_super_and_options():
    r = NVFP4Recipe()
    assert r.bf16_layers(88) == set(range(74, 88))  # 14 of 88, as Megatron-Bridge's Super recipe
    assert NVFP4Recipe(bf16_first_layers=2, bf16_last_fraction=0.0).bf16_layers(10) == {0, 1}
    plan = plan_nvfp4(_model(), NVFP4Recipe(mamba_out_proj="nvfp4", quantize_experts=False, bf16_last_fraction=0.0))
    nv = _gemm_names(plan, "nvfp4")
    assert "model.layers.0.mixer.out_proj" in nv and "model.layers.5.mixer.shared_experts.up_proj" in nv
    assert not any(n.endswith("experts") for n in nv)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(bf16_last_fraction=1.5), "bf16_last_fraction=1.5"), (dict(mamba_out_proj="mxfp8"), "mamba_out_proj='mxfp8'"),
     (dict(bf16_patterns="lm_head"), "tuple of globs"), (dict(bf16_first_layers=-1), "bf16_first_layers=-1")],
)
def test_recipe_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NVFP4Recipe(**kwargs)


def test_prepare_converts_in_place_and_keeps_parameters():
    model = _model()
    before = dict(model.named_parameters())
    keys = set(model.state_dict())
    prepare_nvfp4(model, backend="emulation")
    assert set(model.state_dict()) == keys
    after = dict(model.named_parameters())
    assert all(after[k] is before[k] for k in before)  # same Parameter objects: optimizer-safe
    for d in model.nvfp4_plan:
        mod = model.get_submodule(d.name)
        if d.kind == "linear":
            assert isinstance(mod, NVFP4Linear) == (d.precision == "nvfp4"), d.name
        if d.kind == "experts":
            assert isinstance(mod.gemm, NVFP4GroupedGemm) == (d.precision == "nvfp4"), d.name
    assert "7/17 linear/expert modules in NVFP4" in nvfp4_summary(model)
    with pytest.raises(ValueError, match="already converted"):
        prepare_nvfp4(model)


def test_converted_model_is_close_to_but_not_equal_to_bf16_and_switch_restores_it():
    ref, model = _model(), _model()
    prepare_nvfp4(model, backend="emulation")
    ids = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = model(input_ids=ids).logits
        assert not torch.equal(got, want)
        # 7 quantized GEMMs in series on a random-init model (routing can flip): ~0.28 measured
        assert ((got - want).norm() / want.norm()).item() < 0.5
        assert switch_to_bf16(model, "forward") == 7
        assert torch.equal(model(input_ids=ids).logits, want)  # forward is high precision again
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()  # backward GEMMs still NVFP4
    switch_to_bf16(model, "all")
    assert all(not m.nvfp4_config.any_enabled for m in model.modules() if isinstance(m, NVFP4Linear))


def test_backend_selection_messages(monkeypatch, caplog):
    with pytest.raises(ValueError, match="backend='te' cannot be used: the model is on cpu"):
        prepare_nvfp4(_model(), backend="te")
    with pytest.raises(ValueError, match="not one of"):
        prepare_nvfp4(_model(), backend="fp4")
    monkeypatch.setattr(nvfp4_backend, "_notice_shown", False)
    with caplog.at_level(logging.WARNING, logger=nvfp4_backend.__name__):
        prepare_nvfp4(_model())
        prepare_nvfp4(_model())
    notices = [r for r in caplog.records if "using exact emulation" in r.getMessage()]
    assert len(notices) == 1 and "not a CUDA GPU" in notices[0].getMessage()
    assert _model().__class__ is Nemotron3ForCausalLM  # conversion never changes the model class


def test_switch_requires_prepared_model():
    with pytest.raises(ValueError, match="not converted"):
        switch_to_bf16(nn.Sequential(nn.Linear(4, 4)))


def test_trainer_callback_switches_once_at_fraction():
    model = _model()
    prepare_nvfp4(model, backend="emulation")
    cb = NVFP4SwitchToBF16Callback(0.5)
    state = types.SimpleNamespace(global_step=4, max_steps=10)
    cb.on_step_begin(None, state, None, model=model)
    assert not cb.switched
    state.global_step = 5
    cb.on_step_begin(None, state, None, model=model)
    assert cb.switched and not model.backbone.layers[0].mixer.in_proj.nvfp4_config.any_enabled
    with pytest.raises(ValueError, match="fraction"):
        NVFP4SwitchToBF16Callback(1.5)


def test_accelerate_bf16_training_steps_with_nvfp4_model():
    accelerate = pytest.importorskip("accelerate", reason="accelerate is an optional dependency ([trl]/[test])")
    model = prepare_nvfp4(_model().train(), backend="emulation")
    accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    ids = torch.randint(0, 96, (2, 32))
    w = model.backbone.layers[0].mixer.in_proj.weight
    w0 = w.detach().clone()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        assert w.grad is not None and torch.isfinite(w.grad).all()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss) and not torch.equal(w.detach(), w0)
    assert isinstance(model.backbone.layers[0].mixer.in_proj, NVFP4Linear)
