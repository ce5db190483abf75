"""Logged metrics are global values.

* ``Nemotron3SFTTrainer``: ``loss``, ``lm_loss``, ``mtp_loss``, ``aux_loss`` (and ``mean_token_accuracy``)
  logged by 2 gloo processes equal those of one process on the same global batch, and of one process with
  gradient accumulation; the aux-loss-free expert-bias update on 2 processes uses the loads of both
  (same biases as one process); the first step's ``lm_loss`` equals a plain forward of the initial model on the
  global batch. Rows have different numbers of loss tokens, so a per-rank mean would not match.
* ``Nemotron3GRPOTrainer``: ``env/<name>/share`` equals the share of that environment in the rows the
  trainer actually generated for in each logging window (a rare environment missing from some batches
  included), on one process and on two.
"""

from __future__ import annotations

import tempfile
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.parallel import run_processes
from transformers_nemotron3.tokenizer import build_tiny_tokenizer
from transformers_nemotron3.trainers import (Nemotron3GRPOConfig, Nemotron3GRPOTrainer, Nemotron3SFTConfig,
                                             Nemotron3SFTTrainer)
from transformers_nemotron3.trainers.callbacks import router_modules
from transformers_nemotron3.trainers.environments import DigitsEnvironment, MathEnvironment

try:
    from tiny_configs import tiny_config
except ImportError:  # pragma: no cover
    from modeling_tests.tiny_configs import tiny_config

STEPS = 2
GLOBAL_BATCH = 4
KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "mean_token_accuracy")
# latent_groups_mtp: LatentMoE + MTP, so all three parts are present; aux-loss-free bias updates on
MODEL = dict(moe_aux_loss_coef=0.05, moe_bias_update_rate=1e-3)


# ---------------------------------------------------------------- SFT: component losses
def sft_dataset(vocab: int) -> Dataset:
    """Equal lengths (no padding, so the aux loss of a half batch is exact) but very unequal loss-token counts:
    row i trains on its last 2 + 5 * (i % 4) tokens only."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (GLOBAL_BATCH * STEPS, 24), generator=g).tolist()
    masks = [[0] * (24 - (2 + 5 * (i % 4))) + [1] * (2 + 5 * (i % 4)) for i in range(len(ids))]
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


def sft_trainer(output_dir: str, per_device: int, accumulation: int = 1):
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("latent_groups_mtp", vocab_size=len(tokenizer), **MODEL))
    args = Nemotron3SFTConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, max_steps=STEPS, report_to="none",
        per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation, learning_rate=3e-3,
        logging_steps=1, disable_tqdm=True, save_strategy="no", gradient_checkpointing=False, seed=0,
        assistant_only_loss=False, completion_only_loss=True, packing=False, train_sampling_strategy="sequential",
        dataloader_drop_last=True)
    return Nemotron3SFTTrainer(model=model, args=args, train_dataset=sft_dataset(len(tokenizer)),
                               processing_class=tokenizer)


def logged(trainer) -> list[dict]:
    return [{k: row[k] for k in KEYS} for row in trainer.state.log_history if "loss" in row]


def expert_biases(trainer) -> list:
    return [m.e_score_correction_bias.detach().clone().numpy() for m in router_modules(trainer.model)]


def _sft_rank(rank, world, output_dir):
    trainer = sft_trainer(output_dir, GLOBAL_BATCH // world)
    trainer.train()
    return logged(trainer), expert_biases(trainer)


@pytest.fixture(scope="module")
def single_process_log():
    with tempfile.TemporaryDirectory() as tmp:
        trainer = sft_trainer(tmp, GLOBAL_BATCH)
        first_batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():  # independent oracle for step 1: a plain forward of the initial model
            direct = trainer.model.train()(input_ids=first_batch["input_ids"], labels=first_batch["labels"])
        trainer.train()
        return logged(trainer), direct, expert_biases(trainer)


def assert_logs_equal(got: list[dict], want: list[dict], keys=KEYS) -> None:
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (key, got, want)


def test_single_process_logs_the_model_losses(single_process_log):
    log, direct, _ = single_process_log
    first = log[0]
    assert first["lm_loss"] == pytest.approx(direct.lm_loss.item(), rel=1e-5)
    assert first["mtp_loss"] == pytest.approx(direct.mtp_loss.item(), rel=1e-5)
    assert first["aux_loss"] == pytest.approx(direct.aux_loss.item(), rel=1e-5)
    scale = tiny_config("latent_groups_mtp").mtp_loss_scale
    for row in log:
        assert row["aux_loss"] > 0 and row["mtp_loss"] > 0
        assert row["loss"] == pytest.approx(row["lm_loss"] + row["aux_loss"] + scale * row["mtp_loss"], rel=1e-5)


def test_gradient_accumulation_logs_the_same_values(single_process_log):
    with tempfile.TemporaryDirectory() as tmp:
        trainer = sft_trainer(tmp, GLOBAL_BATCH // 2, accumulation=2)
        trainer.train()
        # accuracy, as in TRL, is a mean of per-micro-batch values (global over ranks, not over micro-batches)
        assert_logs_equal(logged(trainer), single_process_log[0], keys=KEYS[:4])


def test_two_processes_log_the_single_process_values(single_process_log):
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_processes(_sft_rank, 2, args=(tmp,), timeout=180)
    (log0, biases0), (log1, biases1) = ranks
    assert_logs_equal(log0, single_process_log[0])
    assert log0 == log1  # every rank logs the global values
    # the expert-bias update used the loads of both ranks: the same biases as one process on the global batch
    single = single_process_log[2]
    assert any(np.abs(b).max() > 0 for b in single)
    for got, got1, want in zip(biases0, biases1, single):
        assert np.array_equal(got, want) and np.array_equal(got1, want)


# ---------------------------------------------------------------- GRPO: environment shares
ENVIRONMENTS = {"digits": DigitsEnvironment, "math": MathEnvironment}


class RecordingGRPOTrainer(Nemotron3GRPOTrainer):
    """Records, per generation batch, the optimizer step it feeds and the environments of its rows."""

    def _generate_and_score_completions(self, inputs):
        self.generated = getattr(self, "generated", [])
        self.generated.append((self.state.global_step + 1, [row["environment"] for row in inputs]))
        return super()._generate_and_score_completions(inputs)


def grpo_trainer(per_device: int):
    tokenizer = build_tiny_tokenizer(vocab_size=300)
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks", vocab_size=len(tokenizer)))
    args = Nemotron3GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, max_steps=6, report_to="none",
        per_device_train_batch_size=per_device, num_generations=2, max_completion_length=4, learning_rate=1e-3,
        logging_steps=3, num_tasks=64, seed=0, disable_tqdm=True, save_strategy="no",
        gradient_checkpointing=False, environment_weights={"digits": 0.85, "math": 0.15}, task_seed=3)
    return RecordingGRPOTrainer(model=model, environments=ENVIRONMENTS, args=args, processing_class=tokenizer)


def _grpo_rank(rank, world):
    trainer = grpo_trainer(4 // world)
    trainer.train()
    shares = [{k: v for k, v in row.items() if k.startswith("env/")} | {"step": row["step"]}
              for row in trainer.state.log_history if "env/digits/share" in row]
    return {"generated": trainer.generated, "shares": shares, "counts": dict(trainer.environment_counts)}


def check_shares(results: list[dict]) -> None:
    """Oracle: count the recorded rows of every rank per logging window."""
    generated = [item for result in results for item in result["generated"]]
    shares = results[0]["shares"]
    assert [row["step"] for row in shares] == [3, 6]
    previous = 0
    for row in shares:
        window = Counter(env for step, envs in generated if previous < step <= row["step"] for env in envs)
        total = sum(window.values())
        for name in ENVIRONMENTS:
            assert row[f"env/{name}/share"] == pytest.approx(window[name] / total, abs=1e-9), (row, window)
        previous = row["step"]
    batches_with_math = sum("math" in envs for _, envs in generated)
    # the rare environment is missing from some batches: a mean over only the batches with it would be wrong
    assert 0 < batches_with_math < len(generated), generated
    all_rows = Counter(env for _, envs in generated for env in envs)
    assert results[0]["counts"] == dict(all_rows)
    for result in results[1:]:
        assert result["shares"] == shares and result["counts"] == results[0]["counts"]


def test_environment_shares_are_shares_of_generated_rows():
    check_shares([_grpo_rank(0, 1)])


def test_environment_shares_over_two_processes():
    check_shares(run_processes(_grpo_rank, 2, timeout=180))
