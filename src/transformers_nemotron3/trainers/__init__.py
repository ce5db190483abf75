"""TRL trainers for Nemotron 3: SFT with the Nemotron 3 chat format, GRPO over several environments."""

from .callbacks import ExpertBiasUpdateCallback, HistoryCallback, RouterFreezeCallback
from .grpo import Nemotron3GRPOConfig, Nemotron3GRPOTrainer, build_environment_dataset
from .plots import plot_history
from .rollout import MultiEnvRollout
from .sft import Nemotron3SFTConfig, Nemotron3SFTTrainer

__all__ = [
    "Nemotron3SFTConfig", "Nemotron3SFTTrainer", "Nemotron3GRPOConfig", "Nemotron3GRPOTrainer",
    "MultiEnvRollout", "build_environment_dataset", "ExpertBiasUpdateCallback", "RouterFreezeCallback",
    "HistoryCallback", "plot_history",
]
