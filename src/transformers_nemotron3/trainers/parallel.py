"""Expert / context parallelism from the Trainer-based trainers (`Nemotron3SFTTrainer`).

`Nemotron3ParallelTrainerMixin` sits before TRL's trainer in the MRO and, when the trainer's args carry
``parallel_config`` (a `Nemotron3ParallelConfig`, or a dict of its fields), uses only public hooks:

1. ``__init__`` (before ``Trainer.__init__``): ``args.device`` initialises the process group (Accelerate's
   ``PartialState``), then `prepare_nemotron3_parallel` on the bare model *before* ``Trainer`` wraps it (EP:
   experts become ``Shard(0)`` DTensors on the ep mesh dim and all-to-all dispatchers; CP: attention kernel and
   Mamba ``sequence_mixer`` swapped). ``Trainer`` keeps the plain ``Nemotron3ForCausalLM``; its expert DTensors
   are on DDP's ignore list, so Accelerate's DDP averages only the replicated parameters.
2. gradients: nothing here. The expert shards all-reduce their own gradients over edp at the last micro-batch
   (post-accumulate-grad hooks gated by Accelerate's ``sync_gradients``, see `parallel/expert_parallel.py`), and
   transformers' Trainer already handles parameters on several device meshes: one optimizer parameter group
   per mesh, and a global gradient norm / clipping per mesh (``get_total_norm`` + ``full_tensor``).
3. router loads: `ExpertLoadSyncCallback` sums them over all ranks at ``on_optimizer_step``, before
   ``ExpertBiasUpdateCallback`` updates the correction biases at ``on_step_end``.
4. cp > 1, data: Accelerate's own data sharding by device mesh: the trainer hands Accelerate a ``("dp_replicate",
   "cp")`` mesh (``accelerator.state.device_mesh``), so its dataloader gives the cp ranks of one dp group the
   same rows. Loss: ``parallel_forward`` runs the model through a `ContextParallelLM` around the DDP-wrapped
   model and rescales the per-dp-rank mean to the global token mean.
5. ``save_model``: one full official-layout checkpoint (experts gathered, rank 0 writes; collective): what a
   final ``save_model()`` publishes and what ``from_pretrained`` loads in one process.
6. Trainer checkpoints (``save_strategy``): `ShardedCheckpointCallback` adds ``checkpoint-N/sharded/``, a
   ``torch.distributed.checkpoint`` of the model (expert shards, router biases), the optimizer state of every
   shard and the routers' loads (``on_save``); ``train(resume_from_checkpoint=...)`` loads it back at
   ``on_train_begin``, after Trainer restored its own state (step, scheduler, RNG, data position), so a resumed
   sharded run equals the uninterrupted one.

7. evaluation (``Trainer.evaluate``) runs through the same forward: under cp > 1 each batch's loss is the dp
   rank's token mean over the full rows (`ContextParallelLM`), which is what Trainer averages
   (test_parallel_trainer.py: equal to one process's ``eval_loss``). Token accuracy is not logged under cp > 1
   (each rank holds only its part of the logits).

Not handled: FSDP2 (``data_parallel_mode="shard"``) under ``Trainer``.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..parallel.accelerate_plugin import Nemotron3Parallel, prepare_nemotron3_parallel
from ..parallel.config import Nemotron3ParallelConfig
from ..parallel.context_parallel import ContextParallelLM
from ..parallel.expert_parallel import is_expert_shard

__all__ = ["Nemotron3ParallelTrainerMixin", "ExpertLoadSyncCallback", "ShardedCheckpointCallback",
           "as_parallel_config", "SHARDED_DIR"]

SHARDED_DIR = "sharded"  # inside Trainer's checkpoint-N/


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


class ShardedCheckpointCallback(TrainerCallback):
    """Writes ``checkpoint-N/sharded`` (DCP: model, optimizer, router loads) at every Trainer save and loads it
    when training resumes (``resume_dir``, set by the mixin's ``train``). Trainer keeps its own files next to it
    (``trainer_state.json``, scheduler, per-process RNG, the full weights written by ``save_model``)."""

    def __init__(self, par: Nemotron3Parallel) -> None:
        self.par = par
        self.resume_dir: str | None = None

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.par.save_sharded(os.path.join(folder, SHARDED_DIR), optimizer, step=state.global_step)
        return control

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.resume_dir is None:
            return control
        path = os.path.join(self.resume_dir, SHARDED_DIR)
        if not os.path.isdir(path):
            raise ValueError(f"{self.resume_dir} has no {SHARDED_DIR}/ checkpoint: it was not written by a "
                             "parallel_config run. Load its weights into a fresh model instead of resuming.")
        if model is not None:
            model.zero_grad(set_to_none=True)
        # Trainer has loaded its own optimizer.pt (rank 0's view); every rank's moments are in sharded/: start from an
        # empty state, which DCP initialises with the parameters' layout (DTensor moments for expert shards)
        getattr(optimizer, "optimizer", optimizer).state.clear()
        step = self.par.load_sharded(path, optimizer, restore_rng=False)  # Trainer restores RNG per process
        if step != state.global_step:
            raise ValueError(f"{path} holds step {step} but the trainer state says {state.global_step}.")
        self.resume_dir = None
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
        self._nemotron3_checkpoints = ShardedCheckpointCallback(par)
        callbacks.append(self._nemotron3_checkpoints)
        return model

    def _finish_nemotron3_parallel(self) -> None:
        """After ``Trainer.__init__`` (Accelerate exists): under cp > 1 give Accelerate a ``(dp_replicate, cp)`` device
        mesh, from which its dataloader shards batches over dp only (cp ranks of a dp group read the same rows)."""
        par = self.nemotron3_parallel
        if par is None or par.config.cp == 1:
            return
        if self.accelerator.parallelism_config is not None:
            raise ValueError("parallel_config with context_parallel_size > 1 cannot be combined with Accelerate's "
                             "own parallelism_config (it sets the device mesh); use one of them.")
        from torch.distributed.device_mesh import init_device_mesh

        self.accelerator.state.device_mesh = init_device_mesh(
            par.dense_mesh.device_type, (par.config.dp, par.config.cp), mesh_dim_names=("dp_replicate", "cp"))

    # ------------------------------------------------------------------ resume
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; with a parallel config the sharded state of ``resume_from_checkpoint`` is loaded too."""
        if self.nemotron3_parallel is not None and resume_from_checkpoint:
            path = resume_from_checkpoint
            if isinstance(path, bool):
                path = get_last_checkpoint(self.args.output_dir)
                if path is None:
                    raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} has no checkpoint-N.")
            self._nemotron3_checkpoints.resume_dir = path
            resume_from_checkpoint = path
        return super().train(resume_from_checkpoint, *args, **kwargs)

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
