"""Stage ``grpo``: a short GRPO run over two environments at once, thinking on with a token budget.

Uses ``Nemotron3GRPOTrainer`` (TRL's GRPOTrainer with multi-environment rollouts) on the built-in ``math``
environment (exact arithmetic, answer in ``\\boxed{}``: what SFT taught the format of) and ``digits`` (answer
with digits only: never seen in SFT, so there is room to learn). Routers are frozen, as in Nemotron 3's RL.
Check: the reward averaged over the environments (each environment's mean over its first and last quarter of
the steps) rises by at least 0.05.
"""

from __future__ import annotations

from ..trainers import HistoryCallback, Nemotron3GRPOConfig, Nemotron3GRPOTrainer
from ..trainers.callbacks import router_modules
from ..trainers.environments import DigitsEnvironment, MathEnvironment
from .context import StageProgress, quiet_trainer
from .models import require_model, require_tokenizer

NAME = "grpo"
ENVIRONMENTS = {"math": MathEnvironment, "digits": DigitsEnvironment}
MIN_REWARD_GAIN = 0.05
THINKING_BUDGET = 12


def _window_mean(values: list[float], first: bool) -> float:
    n = max(1, len(values) // 4)
    part = values[:n] if first else values[-n:]
    return sum(part) / len(part)


def run(ctx) -> tuple[dict, str]:
    tokenizer = require_tokenizer(ctx)
    model = require_model(ctx)
    size = ctx.size
    steps = ctx.steps(NAME, size.grpo_steps)
    history: list[dict] = []
    if steps:
        args = Nemotron3GRPOConfig(
            output_dir=ctx.stage_dir(NAME), use_cpu=True, bf16=False, max_steps=steps, report_to="none",
            save_strategy="no", per_device_train_batch_size=size.grpo_batch, num_generations=size.grpo_generations,
            max_completion_length=size.grpo_completion_length, learning_rate=size.grpo_learning_rate, logging_steps=1,
            seed=ctx.seed,
            gradient_checkpointing=False, num_tasks=steps * size.grpo_batch, task_seed=ctx.seed,
            enable_thinking=True, thinking_budget=THINKING_BUDGET, freeze_router=True, disable_tqdm=True,
        )
        trainer = Nemotron3GRPOTrainer(model=model, environments=ENVIRONMENTS, args=args, processing_class=tokenizer,
                                       callbacks=[HistoryCallback(ctx.stage_dir(NAME))])
        quiet_trainer(trainer, StageProgress(NAME, keys=("reward", "env/*/reward")))
        trainer.train()
        history = trainer.state.log_history
        for gate in router_modules(model):  # frozen for RL only: unfreeze for whoever trains next
            gate.weight.requires_grad_(True)
    model.eval()
    metrics: dict = {"steps": steps}
    parts = []
    for name in ENVIRONMENTS:
        values = [h[f"env/{name}/reward"] for h in history if f"env/{name}/reward" in h]
        if values:
            metrics[f"reward_before/{name}"] = _window_mean(values, True)
            metrics[f"reward_after/{name}"] = _window_mean(values, False)
            parts.append(f"{name} {metrics[f'reward_before/{name}']:.2f} -> {metrics[f'reward_after/{name}']:.2f}")
    # environment-balanced: each step's batch holds few prompts, so the plain per-step mean swings with the mix
    for when in ("before", "after"):
        per_env = [metrics[f"reward_{when}/{name}"] for name in ENVIRONMENTS if f"reward_{when}/{name}" in metrics]
        metrics[f"reward_{when}"] = sum(per_env) / len(per_env) if per_env else 0.0
    return metrics, (f"{steps} steps over {', '.join(ENVIRONMENTS)}: reward (mean over environments) "
                     f"{metrics['reward_before']:.2f} -> {metrics['reward_after']:.2f} "
                     f"({'; '.join(parts) or 'no rollouts'})")


def check(metrics: dict) -> str | None:
    gain = metrics["reward_after"] - metrics["reward_before"]
    if not gain >= MIN_REWARD_GAIN:
        return (f"mean reward {metrics['reward_before']:.3f} -> {metrics['reward_after']:.3f} rose by less than "
                f"{MIN_REWARD_GAIN}")
    return None
