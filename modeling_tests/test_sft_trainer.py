"""Nemotron3SFTTrainer: chat template, thinking mix, assistant-only masking, packing, MoE/MTP losses."""


import pytest
import torch
from datasets import Dataset
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.tokenizer import build_tiny_tokenizer
from transformers_nemotron3.trainers import Nemotron3SFTConfig, Nemotron3SFTTrainer
from transformers_nemotron3.trainers.callbacks import router_modules


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def conversations(n=16):
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        messages = [{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}.", "reasoning_content": f"add {a} and {b}"}]
        if i % 3 == 0:  # multi-turn: the first answer's reasoning is history
            messages = [{"role": "user", "content": "Hello!"},
                        {"role": "assistant", "content": "Hello! How can I help?", "reasoning_content": "greet back"}
                        ] + messages
        rows.append(messages)
    return Dataset.from_dict({"messages": rows})


def make_trainer(tokenizer, name="all_blocks", steps=2, **overrides):
    torch.manual_seed(0)
    dataset = overrides.pop("dataset", None) or conversations()
    config = tiny_config(name, vocab_size=len(tokenizer), **overrides.pop("model", {}))
    model = Nemotron3ForCausalLM(config)
    args = dict(output_dir="/tmp/nemotron3-sft-test", use_cpu=True, bf16=False, max_steps=steps, report_to="none",
                per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, disable_tqdm=True,
                save_strategy="no", gradient_checkpointing=False, seed=0)
    args.update(overrides)
    return Nemotron3SFTTrainer(model=model, args=Nemotron3SFTConfig(**args),
                               train_dataset=dataset, processing_class=tokenizer)


def trained_text(tokenizer, row):
    return tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])


def trl_masked_text(tokenizer, messages, **kwargs):
    """The oracle: what TRL's training template for the tokenizer's template marks as assistant tokens."""
    from trl.chat_template_utils import get_training_chat_template

    out = tokenizer.apply_chat_template(messages, chat_template=get_training_chat_template(tokenizer),
                                        return_assistant_tokens_mask=True, return_dict=True, **kwargs)
    return tokenizer.decode([t for t, keep in zip(out["input_ids"], out["assistant_masks"]) if keep])


@pytest.mark.parametrize("family", ["nano", "super", "ultra"])
def test_assistant_only_masks_equal_trl_training_template(family):
    from trl import chat_template_utils as trl_templates

    tokenizer = build_tiny_tokenizer(chat_template_family=None)
    trainer = make_trainer(tokenizer, thinking_off_ratio=0.0, chat_template_family=family)
    assert tokenizer.chat_template == getattr(trl_templates, f"nemotron_3_{family}_chat_template")
    source = conversations()
    for index in (0, 1, 3):  # multi-turn (history reasoning truncated), single-turn, multi-turn
        row = trainer.train_dataset[index]
        messages = source[index]["messages"]
        assert trained_text(tokenizer, row) == trl_masked_text(tokenizer, messages)
        assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
        assert "add " in trained_text(tokenizer, row) and "What is" not in trained_text(tokenizer, row)
    assert "greet back" not in tokenizer.decode(trainer.train_dataset[0]["input_ids"])  # truncated history


def test_tokenizer_without_template_gets_the_released_nano_one():
    from trl import chat_template_utils as trl_templates

    tokenizer = build_tiny_tokenizer(chat_template_family=None)
    make_trainer(tokenizer, steps=1)
    assert tokenizer.chat_template == trl_templates.nemotron_3_nano_chat_template


def test_bad_chat_template_family_is_a_value_error():
    with pytest.raises(ValueError, match="chat_template_family='mega'"):
        Nemotron3SFTConfig(output_dir="/tmp/x", chat_template_family="mega", use_cpu=True, bf16=False)


def test_thinking_off_renders_empty_think_and_ratio_is_respected(tokenizer):
    off = make_trainer(tokenizer, thinking_off_ratio=1.0)
    for row in off.train_dataset:
        text = tokenizer.decode(row["input_ids"])
        assert "<think></think>The answer is" in text and "add " not in text
    mixed = make_trainer(tokenizer, thinking_off_ratio=0.5, dataset=conversations(64))
    n_off = sum("<think></think>The answer is" in tokenizer.decode(r["input_ids"]) for r in mixed.train_dataset)
    assert 20 <= n_off <= 44


def test_history_thinking_truncation(tokenizer):
    kept = make_trainer(tokenizer, truncate_history_thinking=False).train_dataset[0]
    cut = make_trainer(tokenizer, truncate_history_thinking=True).train_dataset[0]
    assert "greet back" in tokenizer.decode(kept["input_ids"])
    assert "greet back" not in tokenizer.decode(cut["input_ids"])


def _loss(trainer, batch):
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)).item()


def test_packed_loss_equals_unpacked_loss(tokenizer):
    """BFD packing (padding-free rows, position_ids restarting at 0, no attention mask) == padded batch."""
    packed = make_trainer(tokenizer, packing=True, max_length=256)
    unpacked = make_trainer(tokenizer, packing=False)
    unpacked.model.load_state_dict(packed.model.state_dict())
    row = packed.train_dataset[0]
    assert len(row["seq_lengths"]) >= 3  # several conversations share the row
    batch = packed.data_collator([row])
    assert "attention_mask" not in batch and int((batch["position_ids"] == 0).sum()) == len(row["seq_lengths"])
    pieces, start = [], 0
    for length in row["seq_lengths"]:
        pieces.append({"input_ids": row["input_ids"][start:start + length],
                       "labels": row["labels"][start:start + length]})
        start += length
    padded = unpacked.data_collator(pieces)
    assert "attention_mask" in padded and padded["input_ids"].shape[0] == len(pieces)
    assert _loss(packed, batch) == pytest.approx(_loss(unpacked, padded), abs=1e-5)


def test_sft_loss_falls_with_gradient_checkpointing(tokenizer):
    trainer = make_trainer(tokenizer, steps=30, gradient_checkpointing=True, logging_steps=5)
    blocks = [m for m in trainer.model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert blocks and all(m.gradient_checkpointing for m in blocks)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.6 * losses[0], losses


def test_mtp_aux_loss_and_expert_bias_update(tokenizer):
    trainer = make_trainer(tokenizer, name="latent_groups_mtp", steps=3,
                           model=dict(moe_aux_loss_coef=0.01, moe_bias_update_rate=1e-3))
    before = [g.e_score_correction_bias.clone() for g in router_modules(trainer.model)]
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["mtp_loss"] > 0 and logged["aux_loss"] > 0
    assert logged["loss"] == pytest.approx(
        logged["lm_loss"] + logged["aux_loss"] + trainer.model.config.mtp_loss_scale * logged["mtp_loss"], rel=1e-4)
    after = [g.e_score_correction_bias for g in router_modules(trainer.model)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_expert_bias_update_can_be_turned_off(tokenizer):
    trainer = make_trainer(tokenizer, update_expert_bias=False, model=dict(moe_bias_update_rate=1e-3))
    before = [g.e_score_correction_bias.clone() for g in router_modules(trainer.model)]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(router_modules(trainer.model), before)
               for a in [a.e_score_correction_bias])


def test_bad_ratio_is_a_value_error():
    with pytest.raises(ValueError, match="thinking_off_ratio"):
        Nemotron3SFTConfig(output_dir="/tmp/x", thinking_off_ratio=1.5, use_cpu=True, bf16=False)


def test_example_sft_runs(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "sft.py"
    monkeypatch.setattr("sys.argv", [str(script), "--steps", "2", "--output-dir", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "loss.png").stat().st_size > 1000
