"""SFT a tiny Nemotron 3 on bundled synthetic chat data, on CPU, and plot the loss.

    accelerate launch --config_file examples/accelerate_cpu.yaml examples/sft.py --steps 40
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/sft.py --steps 40 --lora   # PEFT LoRA
    accelerate launch --config_file examples/accelerate_cpu_2proc.yaml examples/sft.py --steps 40    # 2 processes

With ``--lora`` only LoRA adapters (rank 8) on every linear layer train (the routed experts are
grouped weights, not ``nn.Linear``, so they stay frozen) and the adapter is saved to <output_dir>/adapter.
With 2 processes each takes half of every global batch; the logged losses are global means.

Builds a tiny tokenizer and model (no Hub), a synthetic arithmetic chat set with reasoning, and trains
with the Nemotron 3 chat template, half the examples thinking-off, assistant-only loss, BFD packing
(padding-free, correct for Mamba), MoE aux loss + expert-bias updates and the MTP loss.
Writes <output_dir>/loss.png and log_history.json.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modeling_tests"))
from tiny_configs import tiny_config  # noqa: E402

from transformers_nemotron3 import Nemotron3ForCausalLM  # noqa: E402
from transformers_nemotron3.tokenizer import build_tiny_tokenizer  # noqa: E402
from transformers_nemotron3.trainers import HistoryCallback, Nemotron3SFTConfig, Nemotron3SFTTrainer  # noqa: E402


def synthetic_chats(n: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append([
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"The answer is {a + b}.",
             "reasoning_content": f"First, add {a} and {b}. Then check the result."},
        ])
    return Dataset.from_dict({"messages": rows})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output-dir", default="out/sft")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2, help="rows per process and step")
    parser.add_argument("--lora", action="store_true", help="train PEFT LoRA adapters instead of all weights")
    parser.add_argument("--lora-rank", type=int, default=8)
    cli = parser.parse_args()
    if cli.steps < 1:
        raise ValueError(f"--steps {cli.steps}: pass at least 1")

    torch.manual_seed(cli.seed)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config("latent_groups_mtp", vocab_size=len(tokenizer), moe_aux_loss_coef=1e-3,
                         moe_bias_update_rate=1e-3)
    model = Nemotron3ForCausalLM(config)
    args = Nemotron3SFTConfig(
        output_dir=cli.output_dir, use_cpu=True, bf16=False, max_steps=cli.steps,
        per_device_train_batch_size=cli.batch_size, learning_rate=3e-3, lr_scheduler_type="cosine",
        warmup_steps=min(3, cli.steps - 1), logging_steps=min(2, cli.steps), report_to="none",
        save_strategy="no", packing=True, max_length=512, thinking_off_ratio=0.5, gradient_checkpointing=True,
        seed=cli.seed,
    )
    peft_config = None
    if cli.lora:
        try:
            from peft import LoraConfig
        except ImportError as error:
            raise ValueError("--lora needs PEFT: pip install peft") from error

        peft_config = LoraConfig(r=cli.lora_rank, lora_alpha=2 * cli.lora_rank, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
        args.learning_rate = 1e-2
    trainer = Nemotron3SFTTrainer(model=model, args=args, train_dataset=synthetic_chats(256, cli.seed),
                                  processing_class=tokenizer, peft_config=peft_config,
                                  callbacks=[HistoryCallback(cli.output_dir)])
    state = trainer.accelerator.state
    print(f"process {state.process_index} of {state.num_processes} ({state.distributed_type}) ready", flush=True)
    trainer.train()
    if cli.lora:
        trainer.save_model(f"{cli.output_dir}/adapter")
    if trainer.is_world_process_zero():
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        logged = [h for h in trainer.state.log_history if "loss" in h]
        parts = ", ".join(f"{k} {logged[0][k]:.3f} -> {logged[-1][k]:.3f}"
                          for k in ("loss", "lm_loss", "mtp_loss", "aux_loss") if k in logged[0])
        print(f"{cli.steps} steps on {state.num_processes} process(es), trained {trainable:,} of {total:,} "
              f"parameters{' (LoRA)' if cli.lora else ''}: {parts}; curves in {cli.output_dir}/loss.png")


if __name__ == "__main__":
    main()
