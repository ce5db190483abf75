"""Model shapes and step counts of the quickstart, by ``--size``.

``tiny`` is the default: every stage does its job in about two minutes on two CPU cores. ``small`` doubles the
width and the steps for a less toy-like run (a few minutes more). The dense model is a Nemotron-H style hybrid
(Mamba-2 ``M``, attention ``*``, dense MLP ``-``); upcycling turns each ``-`` into a MoE ``E``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QuickstartSize", "SIZES"]


@dataclass(frozen=True)
class QuickstartSize:
    """Everything ``--size`` decides.

    Attributes:
        hidden_size, dense_pattern, num_attention_heads, num_key_value_heads, head_dim, mamba_num_heads,
        mamba_head_dim, ssm_state_size, intermediate_size: the dense model (``Nemotron3Config`` fields).
        num_experts, granularity, top_k: the upcycling (E copies of each FFN, cut G ways, T chosen per token).
        vocab_size: of the tiny byte-level BPE trained on the spot.
        seq_len, batch_size: pretraining sequences.
        pretrain_steps, continue_steps, sft_steps, grpo_steps: optimizer steps per training stage.
        grpo_batch, grpo_generations, grpo_completion_length: GRPO rollouts per step.
        grpo_learning_rate: high enough for the reward to rise within the steps, low enough that the policy
            does not collapse onto the easiest reward (all digits) and leave the MTP head, which RL does not
            train, predicting for a different model.
    """

    hidden_size: int
    dense_pattern: str
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    intermediate_size: int
    num_experts: int
    granularity: int
    top_k: int
    vocab_size: int
    seq_len: int
    batch_size: int
    pretrain_steps: int
    continue_steps: int
    sft_steps: int
    grpo_steps: int
    grpo_batch: int
    grpo_generations: int
    grpo_completion_length: int
    grpo_learning_rate: float


SIZES: dict[str, QuickstartSize] = {
    "tiny": QuickstartSize(
        hidden_size=64, dense_pattern="M-*-M-", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, intermediate_size=128,
        num_experts=4, granularity=1, top_k=2, vocab_size=512, seq_len=64, batch_size=16,
        pretrain_steps=100, continue_steps=40, sft_steps=60, grpo_steps=24,
        grpo_batch=16, grpo_generations=8, grpo_completion_length=16, grpo_learning_rate=1e-3,
    ),
    "small": QuickstartSize(
        hidden_size=128, dense_pattern="M-M*-M-", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=32, intermediate_size=256,
        num_experts=4, granularity=2, top_k=2, vocab_size=768, seq_len=96, batch_size=16,
        pretrain_steps=240, continue_steps=120, sft_steps=160, grpo_steps=40,
        grpo_batch=16, grpo_generations=8, grpo_completion_length=20, grpo_learning_rate=4e-4,
    ),
}
