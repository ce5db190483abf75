"""Nemotron3GRPOTrainer: learning on a trivial environment, several environments, thinking budget,
multi-turn tool rollouts, frozen routers."""

import json
from collections import Counter

import pytest
import torch
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.generation.chat_template import render_tool_call
from transformers_nemotron3.tokenizer import build_tiny_tokenizer
from transformers_nemotron3.trainers import (MultiEnvRollout, Nemotron3GRPOConfig, Nemotron3GRPOTrainer,
                                             build_environment_dataset)
from transformers_nemotron3.trainers.callbacks import router_modules
from transformers_nemotron3.trainers.environments import (DigitsEnvironment, InstructionEnvironment,
                                                          MathEnvironment, ToolEnvironment)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(vocab_size=300)


def make_trainer(tokenizer, environments, steps=2, **overrides):
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks", vocab_size=len(tokenizer)))
    args = dict(output_dir="/tmp/nemotron3-grpo-test", use_cpu=True, bf16=False, max_steps=steps, report_to="none",
                per_device_train_batch_size=8, num_generations=4, max_completion_length=8, learning_rate=2e-2,
                logging_steps=1, num_tasks=64, seed=0, disable_tqdm=True, save_strategy="no",
                gradient_checkpointing=False)
    args.update(overrides)
    return Nemotron3GRPOTrainer(model=model, environments=environments, args=Nemotron3GRPOConfig(**args),
                                processing_class=tokenizer)


def test_mean_reward_rises_on_a_trivial_environment(tokenizer):
    trainer = make_trainer(tokenizer, {"digits": DigitsEnvironment}, steps=24, num_generations=8, logging_steps=4)
    trainer.train()
    rewards = [h["env/digits/reward"] for h in trainer.state.log_history if "env/digits/reward" in h]
    print("digits reward per 4 steps:", [round(r, 3) for r in rewards])
    assert len(rewards) == 6
    assert rewards[0] < 0.2 and min(rewards[-2:]) > rewards[0] + 0.3, rewards


def test_environments_are_sampled_in_proportion():
    weights = {"math": 3.0, "instruction": 1.0, "tool": 0.0}
    envs = {"math": MathEnvironment, "instruction": InstructionEnvironment, "tool": ToolEnvironment}
    counts = Counter(build_environment_dataset(envs, weights, num_tasks=800, seed=0)["environment"])
    assert counts["tool"] == 0
    assert abs(counts["math"] / 800 - 0.75) < 0.05 and abs(counts["instruction"] / 800 - 0.25) < 0.05
    with pytest.raises(ValueError, match="unknown environments"):
        build_environment_dataset(envs, {"chess": 1.0}, num_tasks=4)


def test_multi_environment_run_logs_each_environment(tokenizer):
    envs = {"math": MathEnvironment, "instruction": InstructionEnvironment, "digits": DigitsEnvironment}
    trainer = make_trainer(tokenizer, envs, steps=4, num_generations=2,
                           environment_weights={"math": 2, "instruction": 1, "digits": 1})
    trainer.train()
    logged = {k for h in trainer.state.log_history for k in h}
    for name in envs:
        assert f"env/{name}/reward" in logged and f"env/{name}/completion_length" in logged
        assert f"rewards/{name}_reward/mean" in logged
    counts = trainer.environment_counts
    assert sum(counts.values()) == 32 and counts["math"] > counts["digits"]
    prompts = trainer.train_dataset
    for row in prompts.select(range(8)):  # each row's prompt is the one its environment poses
        assert row["environment"] in envs and json.loads(row["task"])


def test_thinking_budget_is_applied_during_rollouts(tokenizer):
    trainer = make_trainer(tokenizer, {"math": MathEnvironment}, enable_thinking=True, thinking_budget=3,
                           max_completion_length=12)
    rollout = trainer.rollout
    rows = [dict(r) for r in trainer.train_dataset.select(range(6))]
    rollout.rows = rows
    out = rollout([r["prompt"] for r in rows], trainer)
    end = tokenizer.convert_tokens_to_ids("</think>")
    for ids, prompt in zip(out["completion_ids"], out["prompt_ids"]):
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n<think>\n")
        assert end in ids[:4], tokenizer.decode(ids)


class ScriptedRollout(MultiEnvRollout):
    """Plays a fixed sequence of assistant turns instead of sampling."""

    def __init__(self, turns, **kw):
        super().__init__(**kw)
        self.turns = list(turns)

    def _generate(self, model, tokenizer, contexts, max_new_tokens):
        text = self.turns.pop(0)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [(ids, [-1.0] * len(ids)) for _ in contexts]


def test_multi_turn_tool_rollout_masks_tool_responses(tokenizer):
    trainer = make_trainer(tokenizer, {"tool": ToolEnvironment}, max_completion_length=200)
    row = dict(trainer.train_dataset[0])
    temperature = json.loads(row["task"])["temperature"]
    call = render_tool_call({"name": "get_weather", "arguments": {"city": json.loads(row["task"])["city"]}})
    rollout = ScriptedRollout([call + "<|im_end|>", f"It is {temperature} degrees.<|im_end|>"],
                              environments={"tool": ToolEnvironment}, max_completion_length=200)
    rollout.rows = [row]
    out = rollout([row["prompt"]], trainer)
    ids, mask = out["completion_ids"][0], out["env_mask"][0]
    model_text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    env_text = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "<tool_response>" in env_text and "<tool_response>" not in model_text
    assert env_text.startswith("\n<|im_start|>user\n<tool_response>\n{")
    assert env_text.endswith("</tool_response>\n<|im_end|>\n<|im_start|>assistant\n<think></think>")
    assert model_text.endswith(f"It is {temperature} degrees.<|im_end|>")
    assert out["env_reward"] == [1.0] and out["env_turns"] == [2]
    assert all(lp == 0.0 for lp, m in zip(out["logprobs"][0], mask) if not m)
    prompt = tokenizer.decode(out["prompt_ids"][0])
    assert "<tools>" in prompt or "get_weather" in prompt


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_router(tokenizer, freeze):
    trainer = make_trainer(tokenizer, {"digits": DigitsEnvironment}, steps=2, freeze_router=freeze)
    gates = router_modules(trainer.model)
    weights = [g.weight.detach().clone() for g in gates]
    biases = [g.e_score_correction_bias.clone() for g in gates]
    head = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    moved = [not torch.equal(g.weight, w) for g, w in zip(gates, weights)]
    assert all(torch.equal(g.e_score_correction_bias, b) for g, b in zip(gates, biases))
    assert (not any(moved)) if freeze else any(moved)
    assert not torch.equal(trainer.model.lm_head.weight, head)  # the rest of the model still trains


def test_grpo_with_mtp_model_checkpointing_and_bias_updates(tokenizer):
    """LatentMoE + MTP model, gradient checkpointing, aux-loss-free updates: trains, no TRL aux loss."""
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("latent_groups_mtp", vocab_size=len(tokenizer),
                                             moe_bias_update_rate=1e-2))
    args = Nemotron3GRPOConfig(output_dir="/tmp/nemotron3-grpo-test", use_cpu=True, bf16=False, max_steps=2,
                               report_to="none", per_device_train_batch_size=4, num_generations=2,
                               max_completion_length=6, learning_rate=1e-2, num_tasks=8, disable_tqdm=True,
                               save_strategy="no", update_expert_bias=True, gradient_checkpointing=True)
    assert args.router_aux_loss_coef == 0.0
    trainer = Nemotron3GRPOTrainer(model=model, environments={"digits": DigitsEnvironment}, args=args,
                                   processing_class=tokenizer)
    biases = [g.e_score_correction_bias.clone() for g in router_modules(model)]
    trainer.train()
    assert any(not torch.equal(g.e_score_correction_bias, b) for g, b in zip(router_modules(model), biases))
    assert "aux_loss" not in trainer.state.log_history[0]


def test_example_grpo_multi_env_runs(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "grpo_multi_env.py"
    monkeypatch.setattr("sys.argv", [str(script), "--steps", "2", "--output-dir", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert any("env/digits/reward" in h for h in history)
    assert (tmp_path / "reward.png").stat().st_size > 1000
