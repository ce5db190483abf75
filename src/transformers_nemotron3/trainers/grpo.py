"""GRPO over several environments at once: a thin subclass of TRL's ``GRPOTrainer``.

* ``environments`` ({name: factory}) and ``environment_weights`` in the config: the training set is drawn
  task by task, each from an environment chosen with those weights (:func:`build_environment_dataset`),
  so environments are sampled in the configured proportions;
* rollouts (:class:`~.rollout.MultiEnvRollout`, TRL's ``rollout_func``): multi-turn with tool calls, the
  Nemotron 3 chat template, the thinking budget as a logits processor;
* one reward function per environment (``<name>_reward``: the environment's verifiable reward on its own
  rows, None elsewhere), so TRL logs ``rewards/<name>_reward/mean``; the trainer adds
  ``env/<name>/reward``, ``env/<name>/completion_length``, ``env/<name>/turns`` (means over that
  environment's rows of the logging window, all ranks) and ``env/<name>/share`` (its rows / all rows of
  the window, 0 when not sampled);
* ``freeze_router``: router weights stop training and their ``e_score_correction_bias`` is left alone
  (checked every step by :class:`~.callbacks.RouterFreezeCallback`).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from ..generation.chat_template import NEMOTRON3_CHAT_TEMPLATE
from .callbacks import ExpertBiasUpdateCallback, RouterFreezeCallback, router_modules
from .compat import prepare_model_for_trl
from .environments.base import Environment
from .metrics import EnvironmentWindow
from .rollout import MultiEnvRollout

__all__ = ["Nemotron3GRPOConfig", "Nemotron3GRPOTrainer", "build_environment_dataset", "environment_reward"]


@dataclass
class Nemotron3GRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus environment sampling, thinking control and router freezing.

    Args:
        environment_weights: {name: weight}; None samples all environments equally.
        num_tasks: rows of the generated training set (when no ``train_dataset`` is given).
        task_seed: seed of environment choice and task sampling.
        enable_thinking: open assistant turns with ``<think>\\n`` (True) or ``<think></think>`` (False).
        thinking_budget: most reasoning tokens per turn during rollouts (None: no cap).
        thinking_grace_period: extra tokens allowed after the budget to end on a newline.
        freeze_router: keep router weights and correction biases fixed during RL.
        update_expert_bias: call ``model.update_expert_bias`` after each step (ignored with freeze_router).

    ``router_aux_loss_coef`` defaults to 0 here: TRL's GRPO adds Mixtral's softmax load-balancing loss on
    the router logits, which is not the sigmoid-router sequence aux loss Nemotron 3 trains with. Set it
    explicitly to opt in.
    """

    environment_weights: dict | None = field(default=None, metadata={"help": "{environment name: weight}"})
    num_tasks: int = field(default=256, metadata={"help": "Size of the generated task set."})
    task_seed: int = field(default=0, metadata={"help": "Seed of environment and task sampling."})
    enable_thinking: bool = field(default=False, metadata={"help": "Thinking on during rollouts."})
    thinking_budget: int | None = field(default=None, metadata={"help": "Reasoning token cap per turn."})
    thinking_grace_period: int = field(default=0, metadata={"help": "Tokens to find a newline after the cap."})
    freeze_router: bool = field(default=False, metadata={"help": "Freeze router weight and correction bias."})
    update_expert_bias: bool = field(default=False, metadata={"help": "Aux-loss-free bias update each step."})

    def __post_init__(self):
        if self.environment_weights is not None:
            bad = {k: v for k, v in self.environment_weights.items() if not (isinstance(v, (int, float)) and v >= 0)}
            if bad or not any(self.environment_weights.values()):
                raise ValueError(f"environment_weights={self.environment_weights} need non-negative numbers, "
                                 "at least one positive")
        if self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = 0.0
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"thinking_budget={self.thinking_budget} must be >= 0 or None")
        super().__post_init__()


def build_environment_dataset(environments: Mapping[str, Callable[[], Environment]], weights: Mapping | None,
                              num_tasks: int, seed: int = 0) -> Dataset:
    """``num_tasks`` rows: environment drawn by ``weights``, then a task from it.

    Columns: ``prompt`` (chat messages, for TRL and logs), ``environment`` (name) and ``task`` (JSON).
    """
    names = sorted(environments)
    weights = dict(weights) if weights is not None else {name: 1.0 for name in names}
    unknown = set(weights) - set(names)
    if unknown:
        raise ValueError(f"environment_weights name unknown environments {sorted(unknown)}; known: {names}")
    rng = random.Random(seed)
    samplers = {name: environments[name]() for name in names}
    rows = {"prompt": [], "environment": [], "task": []}
    for name in rng.choices(names, weights=[weights.get(n, 0.0) for n in names], k=num_tasks):
        env = samplers[name]
        task = env.sample_task(rng)
        rows["prompt"].append(env.reset(task))
        rows["environment"].append(name)
        rows["task"].append(json.dumps(task))
    return Dataset.from_dict(rows)


def environment_reward(name: str) -> Callable:
    """Reward function for TRL: the rollout's environment reward on rows of ``name``, None on others."""

    def reward(completions, environment, env_reward, **kwargs):
        return [float(r) if e == name else None for e, r in zip(environment, env_reward)]

    reward.__name__ = f"{name}_reward"
    return reward


class Nemotron3GRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` over several :class:`Environment` s (see the module docstring)."""

    def __init__(self, model, environments: Mapping[str, Callable[[], Environment]],
                 args: Nemotron3GRPOConfig | None = None, train_dataset: Dataset | None = None,
                 processing_class=None, callbacks=None, reward_funcs=None, **kwargs):
        if args is None:
            args = Nemotron3GRPOConfig(output_dir="nemotron3-grpo")
        if not isinstance(args, Nemotron3GRPOConfig):
            raise ValueError(f"args must be a Nemotron3GRPOConfig, got {type(args).__name__}")
        if not environments:
            raise ValueError("environments is empty; pass {name: factory}, e.g. {'math': MathEnvironment}")
        if "rollout_func" in kwargs:
            raise ValueError("Nemotron3GRPOTrainer brings its own rollout_func (MultiEnvRollout)")
        if processing_class is not None and getattr(processing_class, "chat_template", None) is None:
            processing_class.chat_template = NEMOTRON3_CHAT_TEMPLATE
        if train_dataset is None:
            train_dataset = build_environment_dataset(environments, args.environment_weights, args.num_tasks,
                                                      args.task_seed)
        self.environment_names = sorted(environments)
        self.rollout = MultiEnvRollout(
            environments, max_completion_length=args.max_completion_length, enable_thinking=args.enable_thinking,
            thinking_budget=args.thinking_budget, thinking_grace_period=args.thinking_grace_period,
            temperature=args.temperature, top_p=args.top_p)
        rewards = [environment_reward(name) for name in self.environment_names] + list(reward_funcs or [])
        callbacks = list(callbacks or [])
        if args.freeze_router and not isinstance(model, str):
            for gate in router_modules(model):
                gate.weight.requires_grad_(False)
            args.router_aux_loss_coef = 0.0
            callbacks.append(RouterFreezeCallback(model))
        elif args.update_expert_bias:
            callbacks.append(ExpertBiasUpdateCallback())
        self.environment_counts: Counter = Counter()  # rows per environment over training, all ranks
        self.environment_window = EnvironmentWindow(self.environment_names)
        with prepare_model_for_trl(model, args):
            super().__init__(model, reward_funcs=rewards, args=args, train_dataset=train_dataset,
                             processing_class=processing_class, callbacks=callbacks, rollout_func=self.rollout,
                             **kwargs)

    def _generate_and_score_completions(self, inputs):
        self.rollout.rows = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.rollout.rows = None
        self._log_environment_metrics(inputs)
        return output

    def _log_environment_metrics(self, rows) -> None:
        """Add this generation batch to the logging window (all ranks, count-weighted; see metrics.py)."""
        mode = "train" if self.model.training else "eval"
        counts = self.environment_window.add(self.accelerator, rows, mode)
        if mode == "train":
            self.environment_counts.update({name: n for name, n in counts.items() if n})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's ``log`` plus the window's ``env/<name>/*`` values (shares of all rows, means over each env's rows)."""
        mode = "train" if self.model.training else "eval"
        for key, value in self.environment_window.pop(mode).items():
            self._metrics[mode][key] = [value]  # TRL's log averages each list: one value per window
        super().log(logs, start_time)
