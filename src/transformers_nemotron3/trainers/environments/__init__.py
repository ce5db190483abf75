"""RL environments: a shared interface (``base``) and built-in verifiable environments."""

from .base import Environment, StepResult, final_answer
from .code_env import CodeEnvironment
from .instruction_env import InstructionEnvironment
from .math_env import MathEnvironment
from .tool_env import ToolEnvironment
from .toy_env import DigitsEnvironment

BUILTIN_ENVIRONMENTS = {
    env.name: env
    for env in (MathEnvironment, CodeEnvironment, ToolEnvironment, InstructionEnvironment, DigitsEnvironment)
}

__all__ = [
    "Environment", "StepResult", "final_answer", "MathEnvironment", "CodeEnvironment", "ToolEnvironment",
    "InstructionEnvironment", "DigitsEnvironment", "BUILTIN_ENVIRONMENTS",
]
