"""Backend choice (emulation vs Transformer Engine) and Trainer use, without a Blackwell GPU.

The TE path is exercised against a stand-in ``transformer_engine`` module that records what the
plugin asks of it; it checks the wiring (module swap, weight copy, autocast only in training,
the BF16 switch), not TE's numerics, which need an SM100 GPU.
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
import torch.nn as nn
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.nvfp4 import (
    NVFP4GroupedGemm,
    NVFP4Linear,
    NVFP4SwitchToBF16Callback,
    prepare_nvfp4,
    switch_to_bf16,
    transformer_engine_unavailable_reason,
)
from transformers_nemotron3.nvfp4 import backend as nvfp4_backend
from transformers_nemotron3.nvfp4 import plugin as nvfp4_plugin


def _model() -> Nemotron3ForCausalLM:
    torch.manual_seed(0)
    return Nemotron3ForCausalLM(tiny_config("all_blocks"))


def test_hopper_is_reported_as_lacking_fp4_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    reason = transformer_engine_unavailable_reason(torch.device("cuda", 0))
    assert reason is not None and "9.0 has no NVFP4 tensor cores" in reason
    assert "not a CUDA GPU" in transformer_engine_unavailable_reason(torch.device("cpu"))


def _fake_transformer_engine(monkeypatch) -> dict:
    log: dict = {"autocast": []}

    class FakeTELinear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)

    @contextlib.contextmanager
    def autocast(enabled=True, recipe=None):
        log["autocast"].append((enabled, recipe))
        yield

    class NVFP4BlockScaling:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    te_pkg = types.ModuleType("transformer_engine")
    te_torch = types.ModuleType("transformer_engine.pytorch")
    te_torch.Linear, te_torch.autocast = FakeTELinear, autocast
    te_common = types.ModuleType("transformer_engine.common")
    te_recipe = types.ModuleType("transformer_engine.common.recipe")
    te_recipe.NVFP4BlockScaling = NVFP4BlockScaling
    te_pkg.pytorch, te_pkg.common, te_common.recipe = te_torch, te_common, te_recipe
    for name, mod in [("transformer_engine", te_pkg), ("transformer_engine.pytorch", te_torch),
                      ("transformer_engine.common", te_common), ("transformer_engine.common.recipe", te_recipe)]:
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(nvfp4_plugin, "select_backend", lambda requested, device=None: "te")
    log["Linear"] = FakeTELinear
    return log


def test_te_backend_wiring_with_a_stand_in_module(monkeypatch):
    log = _fake_transformer_engine(monkeypatch)
    model = _model()
    ref = _model()
    prepare_nvfp4(model, backend="te")
    assert model.nvfp4_backend == "te"
    n_te = 0
    for d in model.nvfp4_plan:
        mod = model.get_submodule(d.name)
        if d.kind == "linear":
            ref_lin = ref.get_submodule(d.name)
            te_ok = ref_lin.in_features % 16 == 0 and ref_lin.out_features % 16 == 0
            assert isinstance(mod, log["Linear"]) == (d.precision == "nvfp4" and te_ok), d.name
            # TE needs dims % 16; other NVFP4 layers (e.g. in_proj 64->200) fall back to emulation
            assert isinstance(mod, NVFP4Linear) == (d.precision == "nvfp4" and not te_ok), d.name
            assert torch.equal(mod.weight, ref_lin.weight)  # weights copied
            n_te += isinstance(mod, log["Linear"])
        if d.kind == "experts" and d.precision == "nvfp4":
            assert isinstance(mod.gemm, NVFP4GroupedGemm)  # experts stay emulated
    assert n_te == 2  # the shared expert (64<->48); the dense MLP (40 wide) and in_proj (200) are not % 16
    ids = torch.randint(0, 96, (1, 16))
    model.train()
    model(input_ids=ids)
    model.eval()
    model(input_ids=ids)
    (on, recipe), (off, _) = log["autocast"]
    assert on is True and off is False
    assert recipe.kwargs == dict(disable_rht=False, disable_stochastic_rounding=False, disable_2d_quantization=False)
    with pytest.raises(ValueError, match="needs the emulation backend"):
        switch_to_bf16(model, "forward")
    switch_to_bf16(model, "all")
    model.train()
    model(input_ids=ids)
    assert log["autocast"][-1][0] is False


def test_auto_backend_is_emulation_on_cpu():
    model = prepare_nvfp4(_model())
    assert model.nvfp4_backend == "emulation"
    assert nvfp4_backend.select_backend("emulation") == "emulation"


def test_hf_trainer_with_switch_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = prepare_nvfp4(_model(), backend="emulation")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 96, (8, 32), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
        bf16=True, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    cb = NVFP4SwitchToBF16Callback(0.5)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert cb.switched and cb.switch_step(4) == 2
    lin = model.backbone.layers[0].mixer.in_proj
    assert isinstance(lin, NVFP4Linear) and not lin.nvfp4_config.any_enabled
