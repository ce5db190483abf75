"""Train a tiny Nemotron 3 with the NVFP4 recipe next to a BF16 baseline, from a plain Accelerate loop.

    accelerate launch --config_file examples/accelerate_cpu.yaml examples/nvfp4_train.py --steps 60
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/nvfp4_train.py --steps 60 --switch-at 0.9

``prepare_nvfp4`` converts the model in place (Nemotron 3 Super layer table: NVFP4 GEMMs with 16x16 weight
blocks, stochastic rounding of gradients, the random Hadamard transform on Wgrad; attention, latent
projections, the last 15 % of layers and the LM head stay BF16) and ``nvfp4_summary`` prints what runs in
which precision. Accelerate runs in ``mixed_precision="bf16"`` (it has no FP4 mode). On CPU and
pre-Blackwell GPUs the format is emulated exactly; SM100 GPUs with Transformer Engine use its kernels.
The same steps run twice from the same initial weights, NVFP4 and BF16, and the script prints both
losses and their gap. ``--switch-at F`` returns the NVFP4 model to BF16 after a fraction F of the steps
(the paper's recovery for the end of training).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM
from transformers_nemotron3.nvfp4 import nvfp4_summary, prepare_nvfp4, switch_to_bf16

TINY = dict(vocab_size=128, hidden_size=64, hybrid_override_pattern="M*E-ME", num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
            chunk_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48, intermediate_size=64)


def markov_batch(step: int, vocab: int, rows: int = 4, length: int = 32) -> torch.Tensor:
    """A fixed random Markov chain with 3 successors per token (learnable; loss floor about 0.9)."""
    succ = torch.randint(3, vocab, (vocab, 3), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1 + step)
    x = torch.empty(rows, length, dtype=torch.long)
    x[:, 0] = torch.randint(3, vocab, (rows,), generator=g)
    for t in range(1, length):
        x[:, t] = succ[x[:, t - 1], torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), rows, True, generator=g)]
    return x


def train(accelerator: Accelerator, nvfp4: bool, steps: int, lr: float, switch_at: float | None) -> list[float]:
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(Nemotron3Config(**TINY)).train()
    if nvfp4:
        prepare_nvfp4(model)
        accelerator.print(nvfp4_summary(model))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0))
    losses = []
    for step in range(steps):
        if nvfp4 and switch_at is not None and step == int(switch_at * steps):
            changed = switch_to_bf16(accelerator.unwrap_model(model))
            accelerator.print(f"step {step}: switched {changed} NVFP4 modules to BF16")
        batch = markov_batch(step, TINY["vocab_size"]).to(accelerator.device)
        with accelerator.autocast():
            loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--switch-at", type=float, default=None, help="fraction of steps after which to use BF16")
    parser.add_argument("--no-baseline", action="store_true", help="skip the BF16 run")
    cli = parser.parse_args()
    if cli.steps < 1:
        raise ValueError(f"--steps {cli.steps}: pass at least 1")
    if cli.switch_at is not None and not 0.0 <= cli.switch_at <= 1.0:
        raise ValueError(f"--switch-at {cli.switch_at}: pass a fraction in [0, 1]")

    accelerator = Accelerator(mixed_precision="bf16")
    fp4 = train(accelerator, True, cli.steps, cli.lr, cli.switch_at)
    window = max(1, cli.steps // 10)
    tail = sum(fp4[-window:]) / window
    accelerator.print(f"NVFP4: loss {fp4[0]:.3f} -> {tail:.3f} (mean of the last {window} steps)")
    if not cli.no_baseline:
        bf16 = train(accelerator, False, cli.steps, cli.lr, None)
        base = sum(bf16[-window:]) / window
        accelerator.print(f"BF16:  loss {bf16[0]:.3f} -> {base:.3f}; NVFP4 - BF16 = {tail - base:+.3f} "
                          f"({100 * (tail - base) / base:+.1f} %)")


if __name__ == "__main__":
    main()
