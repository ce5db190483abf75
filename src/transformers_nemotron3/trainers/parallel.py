"""Expert / context parallelism from the Trainer-based trainers (`Nemotron3SFTTrainer`).

`Nemotron3ParallelTrainerMixin` sits before TRL's trainer in the MRO and does, when the trainer's args
carry ``parallel_config`` (a `Nemotron3ParallelConfig`, or a dict of its fields):

1. ``__init__``: initialises the process group through ``args.device`` (Accelerate's ``PartialState``),
   then `prepare_nemotron3_parallel` on the bare model *before* ``Trainer`` wraps it (EP slices the
   experts and installs the all-to-all dispatchers; CP swaps the mixer forwards). ``Trainer`` keeps the
   plain ``Nemotron3ForCausalLM``; its expert shards are put on DDP's ignore list
   (``_ddp_params_and_buffers_to_ignore``), so Accelerate's DDP averages only the replicated parameters.
2. gradients: before clipping (``_clip_grad_norm``, or ``_get_grad_norm`` when ``max_grad_norm`` is 0)
   the expert-shard gradients are all-reduced over the edp group and divided by the world size
   (`Nemotron3Parallel.reduce_expert_gradients`, same convention as DDP's mean), and the norm used for
   clipping/logging is the *global* norm: dense part (replicated) plus the expert shards' squares summed
   over the ep group. So clipping is identical on every rank and equal to one process.
3. router loads: ``sync_expert_load`` (sum over all ranks) after each optimizer step, before
   ``ExpertBiasUpdateCallback`` updates the correction biases.
4. cp > 1: the train dataloader is sharded over dp (``world / cp``) instead of the world, so the cp ranks
   of one dp group get the same rows; ``parallel_forward`` runs the model through a `ContextParallelLM`
   around the (DDP-wrapped) model and rescales the per-dp-rank mean to the global token mean.
5. ``save_model``: every rank gathers the expert shards over ep; rank 0 writes one full checkpoint in the
   official layout (``save_pretrained`` of the model with the full state dict) plus the tokenizer and
   ``training_args.bin``. Loadable with ``Nemotron3ForCausalLM.from_pretrained`` in one process.

Not handled: optimizer/scheduler state of expert shards in Trainer checkpoints (``save_strategy``
checkpoints keep rank 0's optimizer state only, so resuming a sharded run is not exact), FSDP2
(``data_parallel_mode="shard"``) under ``Trainer``, and evaluation under cp > 1.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..parallel.accelerate_plugin import Nemotron3Parallel, prepare_nemotron3_parallel
from ..parallel.config import Nemotron3ParallelConfig
from ..parallel.context_parallel import ContextParallelLM
from ..parallel.expert_parallel import is_expert_shard

__all__ = ["Nemotron3ParallelTrainerMixin", "ExpertLoadSyncCallback", "as_parallel_config"]


def as_parallel_config(value) -> Nemotron3ParallelConfig | None:
    if value is None or isinstance(value, Nemotron3ParallelConfig):
        return value
    if isinstance(value, str):  # command line: --parallel_config '{"expert_parallel_size": 2}'
        import json

        value = json.loads(value)
    if isinstance(value, dict):
        return Nemotron3ParallelConfig(**value)
    raise ValueError(f"parallel_config must be a Nemotron3ParallelConfig, a dict or None, got {type(value).__name__}")


def parallel_config_to_dict(value):
    return asdict(value) if isinstance(value, Nemotron3ParallelConfig) else value


class ExpertLoadSyncCallback(TrainerCallback):
    """Sums every router's per-rank token loads over all ranks after the optimizer step (before the
    expert-bias update of `ExpertBiasUpdateCallback`, which runs at ``on_step_end``)."""

    def __init__(self, par: Nemotron3Parallel) -> None:
        self.par = par

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.par.sync_expert_load()
        return control


class Nemotron3ParallelTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it); see the module docstring."""

    nemotron3_parallel: Nemotron3Parallel | None = None

    # ------------------------------------------------------------------ setup
    def _setup_nemotron3_parallel(self, model, args, callbacks: list):
        """Apply EP/CP to ``model`` (before ``Trainer.__init__``); returns the model to hand to ``Trainer``."""
        config = as_parallel_config(getattr(args, "parallel_config", None))
        self.nemotron3_parallel = None
        if config is None:
            return model
        if isinstance(model, str):
            raise ValueError("parallel_config needs a built model instance, not a model id.")
        if config.data_parallel_mode != "replicate":
            raise ValueError("the trainers support data_parallel_mode='replicate' only (DDP for the dense "
                             "parameters); FSDP2 'shard' is for plain Accelerate loops.")
        _ = args.device  # Accelerate's PartialState: initialises torch.distributed under torchrun/launch
        if not dist.is_initialized():
            raise ValueError("parallel_config needs torch.distributed: launch with `accelerate launch` / torchrun.")
        par = prepare_nemotron3_parallel(model, config)
        # Trainer wraps the bare model (DDP); the CP wrapper is applied around DDP in `parallel_forward`.
        model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if is_expert_shard(p)]
        if par.model is not model:
            par.model._ddp_params_and_buffers_to_ignore = []
        self.nemotron3_parallel = par
        if getattr(args, "update_expert_bias", False):
            callbacks.insert(0, ExpertLoadSyncCallback(par))
        return model

    # ------------------------------------------------------------------ data (cp > 1)
    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        par = self.nemotron3_parallel
        if par is not None and par.config.cp > 1:
            shard = getattr(dataloader, "batch_sampler", None)
            if shard is None or not hasattr(shard, "num_processes"):
                raise ValueError("context parallelism under Trainer needs a map-style dataset (batch-sampler sharding).")
            shard.num_processes, shard.process_index = par.config.dp, par.dp_rank
        return dataloader

    # ------------------------------------------------------------------ forward (cp > 1)
    def parallel_forward(self, model, inputs: dict, num_items_in_batch=None):
        """Forward for cp > 1: `ContextParallelLM` around the (DDP) model; loss = global token mean, scaled so
        that DDP's mean over all ranks gives the exact gradient. Returns the outputs (``logits`` local)."""
        par = self.nemotron3_parallel
        cache = getattr(self, "_cp_wrapper", None)
        if cache is None or cache.model is not model:
            base_cp = par.model
            cache = ContextParallelLM(model, base_cp.cp_state, pad_token_id=base_cp.pad_token_id)
            self._cp_wrapper = cache
        inputs = dict(inputs)
        inputs.pop("num_items_in_batch", None)
        inputs.pop("use_cache", None)  # ContextParallelLM always runs without a cache
        outputs = cache(**inputs)
        if outputs.get("loss") is not None and num_items_in_batch is not None:
            labels = inputs["labels"]
            local = (labels[:, 1:] != -100).sum().clamp(min=1).to(outputs.loss.dtype)
            total = torch.as_tensor(num_items_in_batch, dtype=outputs.loss.dtype, device=local.device)
            if self.args.average_tokens_across_devices:
                total = total / par.config.cp  # Trainer summed the count over every rank; cp ranks share rows
            else:  # Trainer counted only this rank's rows: make it global over dp
                total = total.clone()
                dist.all_reduce(total, group=par.groups["dp"])
            # ContextParallelLM returns this dp rank's mean; DDP averages over dp*cp ranks whose cp members
            # hold the same value: mean_dp -> sum_dp / total needs the factor local*dp/total.
            outputs["loss"] = outputs.loss * (local * par.config.dp / total)
        return outputs

    # ------------------------------------------------------------------ gradients
    def _nemotron3_global_grad_norm(self, model) -> torch.Tensor:
        par = self.nemotron3_parallel
        dense, expert = [], []
        for p in model.parameters():
            if p.grad is not None:
                (expert if is_expert_shard(p) else dense).append(p.grad.detach().float().pow(2).sum())
        zero = torch.zeros((), device=next(model.parameters()).device)
        dense_sq = torch.stack(dense).sum() if dense else zero
        expert_sq = torch.stack(expert).sum() if expert else zero.clone()
        if par.config.ep > 1:
            dist.all_reduce(expert_sq, group=par.groups["ep"])
        return (dense_sq + expert_sq).sqrt()

    def _clip_grad_norm(self, model):
        if self.nemotron3_parallel is None:
            return super()._clip_grad_norm(model)
        self.nemotron3_parallel.reduce_expert_gradients()
        norm = self._nemotron3_global_grad_norm(model)
        from torch.nn.utils import clip_grads_with_norm_

        clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], self.args.max_grad_norm, norm)
        return norm

    def _get_grad_norm(self, model, grad_norm=None):
        if self.nemotron3_parallel is not None and grad_norm is None:  # max_grad_norm == 0: no clip call
            self.nemotron3_parallel.reduce_expert_gradients()
            grad_norm = self._nemotron3_global_grad_norm(model)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """With a parallel config: one full official-layout checkpoint, gathered from the shards (collective)."""
        par = self.nemotron3_parallel
        if par is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        par.save_checkpoint(output_dir)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        dist.barrier()
