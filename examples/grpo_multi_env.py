"""GRPO on a tiny Nemotron 3 over five environments at once, on CPU, and plot the rewards.

    accelerate launch --config_file examples/accelerate_cpu.yaml examples/grpo_multi_env.py --steps 60

Environments and sampling weights: digits 0.4 (trivially learnable), instruction 0.3 (format constraints),
math 0.1, tool 0.1 (multi-turn get_weather), code 0.1 (sandboxed unit tests). A randomly initialised tiny
model can only learn the first two; the others show that every environment runs in the same batch
and is logged on its own. Thinking is on with a 4-token budget per turn; routers are frozen.
Writes <output_dir>/reward.png, loss.png and log_history.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modeling_tests"))
from tiny_configs import tiny_config  # noqa: E402

from transformers_nemotron3 import Nemotron3ForCausalLM  # noqa: E402
from transformers_nemotron3.tokenizer import build_tiny_tokenizer  # noqa: E402
from transformers_nemotron3.trainers import HistoryCallback, Nemotron3GRPOConfig, Nemotron3GRPOTrainer  # noqa: E402
from transformers_nemotron3.trainers.environments import BUILTIN_ENVIRONMENTS  # noqa: E402

WEIGHTS = {"digits": 0.4, "instruction": 0.3, "math": 0.1, "tool": 0.1, "code": 0.1}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default="out/grpo_multi_env")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    if cli.steps < 1:
        raise ValueError(f"--steps {cli.steps}: pass at least 1")

    torch.manual_seed(cli.seed)
    tokenizer = build_tiny_tokenizer(vocab_size=300)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks", vocab_size=len(tokenizer)))
    args = Nemotron3GRPOConfig(
        output_dir=cli.output_dir, use_cpu=True, bf16=False, max_steps=cli.steps, report_to="none",
        save_strategy="no", per_device_train_batch_size=16, num_generations=4, max_completion_length=16,
        learning_rate=1e-2, logging_steps=min(4, cli.steps), seed=cli.seed, gradient_checkpointing=False,
        environment_weights=WEIGHTS, num_tasks=1024, task_seed=cli.seed,
        enable_thinking=True, thinking_budget=4, freeze_router=True,
    )
    environments = {name: BUILTIN_ENVIRONMENTS[name] for name in WEIGHTS}
    trainer = Nemotron3GRPOTrainer(model=model, environments=environments, args=args, processing_class=tokenizer,
                                   callbacks=[HistoryCallback(cli.output_dir)])
    trainer.train()
    if not trainer.is_world_process_zero():
        return
    total = sum(trainer.environment_counts.values())  # rows generated, all processes
    print(f"{cli.steps} steps, {total} rows:")
    for name in WEIGHTS:
        rewards = [h[f"env/{name}/reward"] for h in trainer.state.log_history if f"env/{name}/reward" in h]
        share = trainer.environment_counts[name] / total
        print(f"  {name:12s} share {share:.2f} (weight {WEIGHTS[name]:.2f})  reward "
              f"{rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else f"  {name:12s} not sampled")
    print(f"curves in {cli.output_dir}/reward.png and loss.png")


if __name__ == "__main__":
    main()
