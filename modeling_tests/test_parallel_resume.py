"""A sharded run stopped and resumed from its DCP checkpoint equals the uninterrupted run and one process.

EP=2 x CP=2 folded on 4 gloo processes (dp=2, edp=2), packed rows of 23 tokens (three documents; CP right-pads
to 24), AdamW (optimizer state to restore) with a decaying LR schedule and gradient clipping through the DTensor-aware clip, aux-loss-free
bias updates on. Four optimizer steps; the interrupted run saves after step 2 (``torch.distributed.checkpoint``:
expert shards, router biases, Adam moments, per-rank router loads), a fresh model with *other* initial weights
loads it and runs steps 3-4. Compared (gathered to full tensors): every weight, every ``e_score_correction_bias``,
Adam's ``exp_avg`` / ``exp_avg_sq`` / ``step``, the per-step losses.

- plain Accelerate loop (`Nemotron3Parallel` helpers: ``save_sharded`` / ``load_sharded``); the bias update runs
  every 2 steps, so the checkpoint after step 2 holds per-rank router loads that the resumed run must add in;
  once with DDP (``replicate``), once with FSDP2 for the dense blocks and the experts (``shard``);
- `Nemotron3SFTTrainer` with ``save_strategy="steps"`` and ``train(resume_from_checkpoint=True)``, 2 micro-batches of
  gradient accumulation per step (the expert shards reduce at the synced one only);
- a checkpoint of the 4-process run resumed on 2 processes with another layout (EP=2, no CP).
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from torch.distributed.tensor import DTensor

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.parallel import (
    Nemotron3ParallelConfig, gather_full_state_dict, param_groups_by_mesh, prepare_nemotron3_parallel, run_processes,
)

try:
    from tiny_configs import tiny_config
except ImportError:  # pragma: no cover
    from modeling_tests.tiny_configs import tiny_config

TOL = 1e-5
STEPS, STOP = 4, 2
LENGTH = 23  # odd: CP=2 pads to 24
LR, EPS, MAX_NORM = 5e-3, 1e-6, 0.5  # eps 1e-6: coordinates with ~0 gradient do not turn rounding into updates
BIAS_RATE, BIAS_EVERY = 1e-2, 2
PARALLEL = {"expert_parallel_size": 2, "context_parallel_size": 2}


def _config(**extra):
    return tiny_config("all_blocks", moe_bias_update_rate=BIAS_RATE, **extra)


def _batch(step: int, rows: int, vocab: int):
    """Rows of three packed documents (7, 9 and 7 tokens), a new batch every step."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, vocab, (rows, LENGTH), generator=g)
    pos = torch.arange(LENGTH)[None].repeat(rows, 1)
    pos[:, 7:16] = torch.arange(9)
    pos[:, 16:] = torch.arange(LENGTH - 16)
    return ids, pos


def _optimizer(params):
    return torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0.01)


def _scheduler(optimizer):  # a decaying LR: a resume that lost the scheduler state would use the wrong LR
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.25, total_iters=STEPS)


def _full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _snapshot(model, optimizer) -> dict:
    """Weights + router biases (state dict) and Adam state per parameter name, as full tensors (collective)."""
    out = {f"w.{k}": v for k, v in gather_full_state_dict(model).items()}
    for name, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            out[f"opt.{name}.{key}"] = _full(value).float()
    return out


def _numpy(state: dict) -> dict:  # numpy: pickled by value through the result queue
    return {k: v.numpy() for k, v in state.items()}


def _max_diff(a: dict, b: dict, prefix: str = "") -> tuple[float, str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    worst = (0.0, "")
    for k in a:
        if k.startswith(prefix):
            d = float((torch.as_tensor(a[k]).double() - torch.as_tensor(b[k]).double()).abs().max())
            worst = max(worst, (d, k))
    return worst


# ------------------------------------------------------------------------------------------- plain loop

def _assert_resumed_equals_uninterrupted_and_one_process(r0: dict, ref_losses: list, ref_state: dict) -> None:
    """Losses, weights (``w.``) and optimizer state (``opt.``): resumed == uninterrupted == one process, within TOL."""
    assert max(abs(a - b) for a, b in zip(r0["resumed_losses"], r0["full_losses"])) < TOL
    assert max(abs(a - b) for a, b in zip(r0["full_losses"], ref_losses)) < TOL, (r0["full_losses"], ref_losses)
    for prefix in ("w.", "opt."):
        resumed = _max_diff(r0["resumed"], r0["full"], prefix)
        single = _max_diff(r0["full"], ref_state, prefix)
        print(f"\n{prefix} resumed vs uninterrupted {resumed}, parallel vs one process {single}")
        assert resumed[0] < TOL, resumed
        assert single[0] < TOL, single


def _one_process_loop() -> tuple[list[float], dict]:
    """The oracle: one process, unpadded rows, the mean of the dp slices' losses, the same schedule."""
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(_config()).float().train()
    opt = _optimizer(model.parameters())
    sched = _scheduler(opt)
    dp, losses = 2, []
    for step in range(STEPS):
        ids, pos = _batch(step, 2 * dp, model.config.vocab_size)
        total = 0.0
        for d in range(dp):
            sl = slice(2 * d, 2 * d + 2)
            loss = model(ids[sl], labels=ids[sl], position_ids=pos[sl]).loss / dp
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % BIAS_EVERY == 0:  # after steps 1 and 3: the checkpoint after step 2 holds pending loads
            model.update_expert_bias()
        losses.append(total)
    return losses, _snapshot(model, opt)


def _parallel_loop(accelerator, mode: str, seed: int, steps: range, save: str | None = None,
                   resume: str | None = None, parallel: dict = PARALLEL):
    torch.manual_seed(seed)
    model = Nemotron3ForCausalLM(_config()).float().train()
    par = prepare_nemotron3_parallel(model, Nemotron3ParallelConfig(**parallel, data_parallel_mode=mode))
    opt = _optimizer(param_groups_by_mesh(par.model.parameters()))
    if mode == "shard":  # FSDP2 already wraps the model: Accelerate prepares only the optimizer
        ddp_model, opt = par.model, accelerator.prepare(opt)
    else:
        ddp_model, opt = accelerator.prepare(par.model, opt)
    sched = _scheduler(opt.optimizer)
    if resume is not None:
        assert par.load_sharded(resume, opt, scheduler=sched) == steps.start
    losses, local_tokens = [], None
    for step in steps:
        ids, pos = _batch(step, 2 * par.config.dp, model.config.vocab_size)
        out = ddp_model(**par.shard_batch({"input_ids": ids, "position_ids": pos}))
        local_tokens = out.logits.shape[1]
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(ddp_model.parameters(), MAX_NORM)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % BIAS_EVERY == 0:  # after steps 1 and 3: the checkpoint after step 2 holds pending loads
            par.sync_expert_load()
            par.base.update_expert_bias()
        losses.append(par.mean_loss(out.loss))
    pending = sum(int(m.expert_load is not None) for m in par.base.modules() if hasattr(m, "expert_load"))
    if save is not None:
        par.save_sharded(save, opt, step=steps.stop, scheduler=sched)
    return losses, _snapshot(par.base, opt.optimizer), local_tokens, pending


def _loop_ranks(rank, world, folder, mode):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    ckpt = os.path.join(folder, "step-2")
    full_losses, full_state, local_tokens, _ = _parallel_loop(accelerator, mode, 0, range(STEPS))
    first_losses, _, _, pending = _parallel_loop(accelerator, mode, 0, range(STOP), save=ckpt)
    files = sorted(os.listdir(folder))
    rest_losses, resumed_state, _, _ = _parallel_loop(accelerator, mode, 7, range(STOP, STEPS), resume=ckpt)
    bad = None
    try:
        accelerator_model = Nemotron3ForCausalLM(_config()).float()
        prepare_nemotron3_parallel(accelerator_model, Nemotron3ParallelConfig(**PARALLEL)).load_sharded(folder)
    except ValueError as err:
        bad = str(err)
    keep = rank == 0
    return {"full_losses": full_losses, "resumed_losses": first_losses + rest_losses, "files": files,
            "local_tokens": local_tokens, "pending_loads": pending, "bad_path_error": bad,
            "full": _numpy(full_state) if keep else None, "resumed": _numpy(resumed_state) if keep else None}


@pytest.mark.parametrize("mode", ["replicate", "shard"])
def test_accelerate_loop_ep2_cp2_resume_equals_uninterrupted_and_one_process(tmp_path, mode):
    """``replicate``: DDP for the dense part; ``shard``: FSDP2 for the dense blocks (world) and the experts (edp)."""
    out = run_processes(_loop_ranks, 4, (str(tmp_path), mode), timeout=300)
    ref_losses, ref_state = _one_process_loop()
    r0 = out[0]
    assert r0["local_tokens"] == 12  # 23 -> 24 tokens over cp=2: the padding is in play
    assert r0["pending_loads"] > 0  # the checkpoint after step 2 holds router loads not yet applied
    assert r0["files"] == ["step-2"], r0["files"]  # written to a temporary dir, renamed into place
    assert r0["bad_path_error"] and "not a sharded checkpoint" in r0["bad_path_error"]
    for r in out:
        assert r["full_losses"] == r0["full_losses"]  # every rank logs the global loss
    _assert_resumed_equals_uninterrupted_and_one_process(r0, ref_losses, ref_state)
    moved = max(float(abs(v).max()) for k, v in ref_state.items() if k.endswith("e_score_correction_bias"))
    assert moved >= BIAS_RATE  # the bias update ran


def _save_on_four(rank, world, ckpt):
    from accelerate import Accelerator

    _, _, _, pending = _parallel_loop(Accelerator(cpu=True), "replicate", 0, range(STOP), save=ckpt)
    return pending


def _resume_on_two(rank, world, ckpt):
    from accelerate import Accelerator

    losses, state, _, _ = _parallel_loop(Accelerator(cpu=True), "replicate", 7, range(STOP, STEPS), resume=ckpt,
                                         parallel={"expert_parallel_size": 2})
    return {"losses": losses, "state": _numpy(state) if rank == 0 else None}


def test_resume_on_another_world_size_and_layout_equals_one_process(tmp_path):
    """Saved by EP=2 x CP=2 on 4 processes after step 2 (with router loads pending on every rank), resumed by EP=2
    without CP on 2 processes (same dp, so the same rows per step): DCP reshards the experts and their Adam
    moments, the four ranks' loads are summed into the new rank 0, and steps 3-4 equal one process's."""
    ckpt = str(tmp_path / "step-2")
    pending = run_processes(_save_on_four, 4, (ckpt,), timeout=300)
    assert pending[0] > 0
    out = run_processes(_resume_on_two, 2, (ckpt,), timeout=300)
    ref_losses, ref_state = _one_process_loop()
    assert out[0]["losses"] == out[1]["losses"]
    assert max(abs(a - b) for a, b in zip(out[0]["losses"], ref_losses[STOP:])) < TOL, (out[0]["losses"], ref_losses)
    for prefix in ("w.", "opt."):
        worst = _max_diff(out[0]["state"], ref_state, prefix)
        print(f"\n{prefix} resumed on 2 processes vs one process {worst}")
        assert worst[0] < 3 * TOL, worst  # CP's reduction order in steps 1-2, as in test_parallel_trainer


# ------------------------------------------------------------------------------------------- Trainer
def _dataset(vocab: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(3, vocab, (4 * STEPS, LENGTH), generator=g).tolist()})


class _StopAt:
    """Callback: stop training after ``step`` optimizer steps (the checkpoint of that step is written)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    control.should_training_stop = True
                return control

        return Stop()


def _trainer(output_dir: str, per_device: int, parallel: dict | None, seed: int = 0, stop: int | None = None,
             accumulation: int = 1):
    from transformers_nemotron3.tokenizer import build_tiny_tokenizer
    from transformers_nemotron3.trainers import Nemotron3SFTConfig, Nemotron3SFTTrainer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = Nemotron3ForCausalLM(_config(vocab_size=len(tokenizer)))
    args = Nemotron3SFTConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, max_steps=STEPS, report_to="none",
        per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation, learning_rate=LR, adam_epsilon=EPS, weight_decay=0.01,
        max_grad_norm=MAX_NORM, logging_steps=1, disable_tqdm=True, save_strategy="steps", save_steps=STOP,
        seed=0, assistant_only_loss=False, packing=False, train_sampling_strategy="sequential",
        dataloader_drop_last=True, expert_bias_update_rate=BIAS_RATE, parallel_config=parallel)
    return Nemotron3SFTTrainer(model=model, args=args, train_dataset=_dataset(len(tokenizer)),
                               processing_class=tokenizer, callbacks=[_StopAt(stop)] if stop else None)


def _trainer_losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def _trainer_ranks(rank, world, folder):
    # 1 row per micro-batch, 2 micro-batches per step (dp=2: 4 rows per step, as the one-process batch of 4): the
    # expert shards must reduce once, at the synced micro-batch
    full = _trainer(os.path.join(folder, "full"), 1, PARALLEL, accumulation=2)
    full.train()
    full_state = _snapshot(full.nemotron3_parallel.base, full.optimizer)
    first = _trainer(os.path.join(folder, "run"), 1, PARALLEL, stop=STOP, accumulation=2)
    first.train()
    ckpt_files = sorted(os.listdir(os.path.join(folder, "run", f"checkpoint-{STOP}")))
    resumed = _trainer(os.path.join(folder, "run"), 1, PARALLEL, seed=7, accumulation=2)  # other initial weights
    resumed.train(resume_from_checkpoint=True)
    resumed_state = _snapshot(resumed.nemotron3_parallel.base, resumed.optimizer)
    keep = rank == 0
    return {"full_losses": _trainer_losses(full), "resumed_losses": _trainer_losses(resumed),
            "ckpt_files": ckpt_files, "full": _numpy(full_state) if keep else None,
            "resumed": _numpy(resumed_state) if keep else None}


def test_sft_trainer_ep2_cp2_save_strategy_resume_equals_uninterrupted_and_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        out = run_processes(_trainer_ranks, 4, (tmp,), timeout=400)
        ref = _trainer(os.path.join(tmp, "single"), 4, None)
        ref.train()
        ref_losses, ref_state = _trainer_losses(ref), _snapshot(ref.model, ref.optimizer)
    r0 = out[0]
    assert "sharded" in r0["ckpt_files"] and "trainer_state.json" in r0["ckpt_files"], r0["ckpt_files"]
    assert "config.json" in r0["ckpt_files"]  # the full official layout next to it
    assert len(r0["full_losses"]) == len(r0["resumed_losses"]) == len(ref_losses) == STEPS
    _assert_resumed_equals_uninterrupted_and_one_process(r0, ref_losses, ref_state)
