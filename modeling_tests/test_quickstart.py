"""`nemotron3 quickstart`: a fast subset end to end, every stage's check able to fail, argument errors.

The full default run (all nine stages, a few minutes) is the README's first command, not a unit test; here
the cheap stages run for real (pretraining shortened), and the training stages' checks are shown to fail
when the stage does nothing (``--no-train``).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from transformers_nemotron3.cli import main
from transformers_nemotron3.quickstart import STAGES, parse_stages
from transformers_nemotron3.quickstart import runner, stage_reload, stage_save
from transformers_nemotron3.quickstart.context import QuickstartContext
from transformers_nemotron3.quickstart.sizes import SIZES


@pytest.fixture
def short_tiny(monkeypatch):
    """The tiny size with a shorter pretraining (still enough to halve the loss)."""
    monkeypatch.setitem(SIZES, "tiny", replace(SIZES["tiny"], pretrain_steps=30, batch_size=8))


def _statuses(out) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        return {s["name"]: s for s in json.load(f)["stages"]}


def test_quickstart_subset_end_to_end(tmp_path, capsys, short_tiny):
    out = str(tmp_path / "qs")
    assert main(["quickstart", "--stages", "pretrain,upcycle,save,reload,publish", "--out", out, "--threads", "2"]) == 0
    stages = _statuses(out)
    assert [s for s in stages] == ["pretrain", "upcycle", "save", "reload", "publish"]
    pretrain = stages["pretrain"]["metrics"]
    assert pretrain["loss_after"] <= 0.5 * pretrain["loss_before"]
    assert stages["upcycle"]["metrics"]["max_logit_diff"] <= 1e-4
    reload = stages["reload"]["metrics"]
    assert reload["max_logit_diff"] <= 1e-5 and reload["same_tokens"]
    assert not reload["class"].startswith("transformers_nemotron3")
    assert stages["publish"]["status"] in ("ok", "skipped (publish not installed)")
    files = os.listdir(os.path.join(out, "model"))
    assert {"modeling_nemotron3.py", "config.json", "tokenizer.json", "training_summary.json"} <= set(files)
    with open(os.path.join(out, "model", "training_summary.json")) as f:
        assert [s["name"] for s in json.load(f)["stages"]] == list(stages)
    assert os.path.exists(os.path.join(out, "curves.png")) and os.path.exists(os.path.join(out, "pretrain", "loss.png"))
    printed = capsys.readouterr().out
    assert "reload" in printed and "max |logit diff|" in printed


def test_stages_that_do_nothing_fail_and_are_named(tmp_path, capsys, short_tiny):
    out = str(tmp_path / "qs")
    assert main(["quickstart", "--stages", "pretrain,upcycle,sft", "--no-train", "pretrain,sft", "--out", out]) == 1
    stages = _statuses(out)
    for name in ("pretrain", "sft"):  # failed by their checks (loss did not fall), not by an exception
        assert stages[name]["status"] == "FAILED" and "did not fall" in stages[name]["message"], stages[name]
        assert stages[name]["metrics"]["steps"] == 0
    assert stages["upcycle"]["status"] == "ok"  # function preservation holds for an untrained source too
    assert "FAILED stage(s): pretrain, sft" in capsys.readouterr().err


def test_reload_check_fails_when_the_saved_model_is_not_the_one_in_memory(tmp_path, short_tiny):
    ctx = QuickstartContext(out=str(tmp_path), size=SIZES["tiny"], no_train=frozenset({"pretrain"}))
    for name in ("pretrain", "upcycle", "save"):
        runner.run_stage(ctx, name)
    with torch.no_grad():
        ctx.model.lm_head.weight.add_(0.01)  # the live model drifts from what was saved
    result = runner.run_stage(ctx, "reload")
    assert result.failed and "reloaded logits differ" in result.message


# metrics that pass and, changed in one place, fail each stage's check
PASSING = {
    "pretrain": {"loss_before": 6.0, "loss_after": 1.0},
    "upcycle": {"max_logit_diff": 1e-6, "experts": 4},
    "continue": {"loss_before": 1.0, "loss_after": 0.9, "mtp_loss_before": 6.0, "mtp_loss_after": 1.0},
    "sft": {"loss_before": 8.0, "loss_after": 1.0, "loss_before_no_think": 9.0, "loss_after_no_think": 1.0},
    "grpo": {"reward_before": 0.1, "reward_after": 0.3},
    "generate": {"reasoning_tokens_capped": 4, "thinking_budget": 5, "mtp_equals_greedy": True,
                 "acceptance_length": 1.6, "acceptance_length_untrained_head": 1.1},
    "save": {"problems": []},
    "reload": {"max_logit_diff": 0.0, "class": "transformers_modules.model.Nemotron3ForCausalLM", "same_tokens": True},
    "publish": {"installed": True, "problems": []},
}
BREAKS = [
    ("pretrain", {"loss_after": 4.0}), ("upcycle", {"max_logit_diff": 1e-2}), ("upcycle", {"experts": 1}),
    ("continue", {"mtp_loss_after": 5.0}), ("continue", {"loss_after": 1.2}), ("sft", {"loss_after": 6.0}),
    ("sft", {"loss_after_no_think": 8.0}), ("grpo", {"reward_after": 0.12}),
    ("generate", {"reasoning_tokens_capped": 9}), ("generate", {"mtp_equals_greedy": False}),
    ("generate", {"acceptance_length": 1.0}), ("generate", {"acceptance_length_untrained_head": 1.7}),
    ("save", {"problems": ["no config.json"]}),
    ("reload", {"max_logit_diff": 1e-3}), ("reload", {"same_tokens": False}),
    ("reload", {"class": "transformers_nemotron3.modeling.Nemotron3ForCausalLM"}),
    ("publish", {"problems": ["no tokenizer.json"]}),
]


def test_every_stage_has_a_check_that_passes_and_fails():
    assert set(PASSING) == set(STAGES) == {name for name, _ in BREAKS}
    for name, metrics in PASSING.items():
        assert STAGES[name].check(metrics) is None, name
    for name, change in BREAKS:
        assert STAGES[name].check({**PASSING[name], **change}), (name, change)


def test_save_check_finds_missing_pieces(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.Model"}}))
    problems = stage_save.folder_problems(str(tmp_path))
    assert any("safetensors" in p for p in problems) and any("modeling_x.py" in p for p in problems)
    assert any("tokenizer.json" in p for p in problems)


def test_bad_arguments_are_errors(capsys):
    with pytest.raises(ValueError, match="unknown stage"):
        parse_stages("pretrain,fly")
    with pytest.raises(ValueError, match="add save"):
        parse_stages("reload")
    assert parse_stages("save,pretrain") == ["pretrain", "save"]
    assert main(["quickstart", "--no-train", "upcycle"]) == 2
    assert main(["quickstart", "--stages", "sft", "--nvfp4"]) == 2
    assert "not training stages" in capsys.readouterr().err


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_every_command_module_has_a_main():
    import importlib

    from transformers_nemotron3.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
