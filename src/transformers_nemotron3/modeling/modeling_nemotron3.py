"""Nemotron 3 models: `Nemotron3Model` (the backbone) and `Nemotron3ForCausalLM` (backbone + lm_head + MTP).

Parameters are named like transformers' native NemotronH (``model.layers.N.mixer...``, fused 3-D routed experts,
``lm_head``) plus ``mtp.layers.N...`` for the multi-token-prediction head. Loading and saving are transformers'
own ``from_pretrained`` / ``save_pretrained``; the official on-disk layout (``backbone.*``, one tensor per expert)
is a conversion mapping (`checkpoint_layout.py`). This file and its single-dot imports are copied next to saved
weights, so a plain transformers install loads them with ``trust_remote_code``.
"""

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import Nemotron3Attention
from .blocks import Nemotron3Block, Nemotron3RMSNorm
from .cache import Nemotron3HybridCache, seq_length
from .checkpoint_layout import load_official_state_dict_hook
from .configuration_nemotron3 import Nemotron3Config
from .loss import causal_lm_loss
from .mamba2 import GatedRMSNorm, Nemotron3Mamba2Mixer
from .moe import Nemotron3Experts, Nemotron3MoE, Nemotron3Router, keeps_seams
from .mtp import Nemotron3MTP

try:  # transformers >= 5.24 names the generation cache `cache`; earlier 5.x releases `past_key_values`
    from transformers.generation.utils import ALL_CACHE_NAMES as _ALL_CACHE_NAMES
except ImportError:  # pragma: no cover
    _ALL_CACHE_NAMES = ["past_key_values"]
CACHE_FIELD = "cache" if "cache" in _ALL_CACHE_NAMES else "past_key_values"
_CACHE_ALIASES = ("cache", "past_key_values", "cache_params")


@dataclass
class Nemotron3ModelOutput(ModelOutput):
    """Backbone output. The cache sits under ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier)."""

    last_hidden_state: torch.Tensor | None = None
    if CACHE_FIELD == "cache":
        cache: Nemotron3HybridCache | None = None
    else:
        past_key_values: Nemotron3HybridCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class Nemotron3CausalLMOutput(ModelOutput):
    """Causal-LM output: total ``loss`` = LM loss + MoE aux loss + scaled MTP loss (each also reported)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    if CACHE_FIELD == "cache":
        cache: Nemotron3HybridCache | None = None
    else:
        past_key_values: Nemotron3HybridCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


def _pop_cache(kwargs: dict, cache):
    for name in _CACHE_ALIASES:
        value = kwargs.pop(name, None)
        if cache is None and value is not None:
            cache = value
    return cache


def seq_idx_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Packed rows (position ids restarting at 0) -> sequence index per token; None when nothing restarts."""
    restarts = position_ids[:, 1:] == 0
    if not bool(restarts.any()):
        return None
    return torch.cat([torch.zeros_like(position_ids[:, :1]), restarts.long().cumsum(-1)], dim=-1)


def build_attention_mask(
    padding: torch.Tensor | None, seq_idx: torch.Tensor | None, q_len: int, kv_len: int, device
) -> torch.Tensor | None:
    """Boolean [b, 1, q, kv] mask (True = attend) or None when plain causal attention is enough."""
    if padding is None and seq_idx is None and (q_len == 1 or q_len == kv_len):
        return None
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None]
    mask = causal
    if seq_idx is not None:
        mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :])
    if padding is not None:
        mask = mask & padding[:, None, :]
        # rows of padding queries would see nothing; let them see themselves (their output is never used)
        empty = ~mask.any(-1, keepdim=True)
        if bool(empty.any()):
            eye = torch.zeros(q_len, kv_len, dtype=torch.bool, device=device)
            eye[:, kv_len - q_len :] = torch.eye(q_len, dtype=torch.bool, device=device)
            mask = mask | (empty & eye)
    return mask[:, None]


AUTO_MAP = {
    "AutoConfig": "configuration_nemotron3.Nemotron3Config",
    "AutoModel": "modeling_nemotron3.Nemotron3Model",
    "AutoModelForCausalLM": "modeling_nemotron3.Nemotron3ForCausalLM",
}


class Nemotron3PreTrainedModel(PreTrainedModel):
    """Weight init, the flags transformers reads, and saving in the official layout with remote code."""

    config_class = Nemotron3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Nemotron3Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = False
    _is_stateful = False  # the cache rolls back (activate_past_recording + crop), so assisted decoding works
    _can_compile_fullgraph = False
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]
    _can_record_outputs = {
        "hidden_states": Nemotron3Block,
        "attentions": OutputRecorder(Nemotron3Attention, index=1),
        "router_logits": OutputRecorder(Nemotron3Router, index=0),
    }

    # `save_pretrained(push_to_hub=True)` calls this with (folder, repo_id, private=, token=, commit_message=) when
    # set; this package sets it to its `publish` (checks + model card), the saved remote code leaves it None
    hub_uploader = None

    def __init__(self, config: Nemotron3Config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        # Trainer's resume / best-model reload call load_state_dict on the official files save_pretrained wrote
        self.register_load_state_dict_pre_hook(load_official_state_dict_hook)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # the experts (moe.py) use @use_experts_implementation; transformers looks only in this file

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """``"eager"`` (this package's experts path: dispatcher / GEMM seams, CPU decode kernels) unless another is
        asked for; SwiGLU experts (``moe_gated_experts``) run eagerly only."""
        if requested_experts is None:
            return "eager"
        if not keeps_seams(requested_experts) and getattr(self.config, "moe_gated_experts", False):
            raise ValueError(
                f"experts_implementation={requested_experts!r} needs transformers' fused gate_up layout; this model's "
                "SwiGLU experts (moe_gated_experts=True) keep separate gate/up weights and run with 'eager'."
            )
        return super().get_correct_experts_implementation(requested_experts)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module; parameters loaded from a checkpoint are left alone (transformers' ``init``
        helpers skip them)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.Conv1d):
            bound = 1 / math.sqrt(module.kernel_size[0])
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (Nemotron3RMSNorm, GatedRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, Nemotron3Router):
            init.normal_(module.weight, 0.0, std)
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, Nemotron3Experts):
            for p in (module.up_proj, module.down_proj, module.gate_proj):
                if p is not None:
                    init.normal_(p, 0.0, std)
        elif isinstance(module, Nemotron3Mamba2Mixer):
            c = self.config
            init.copy_(module.A_log, torch.log(torch.arange(1, c.mamba_num_heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            dt = torch.exp(torch.rand(c.mamba_num_heads) * (math.log(c.time_step_max) - math.log(c.time_step_min))
                           + math.log(c.time_step_min)).clamp(min=c.time_step_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, push_to_hub: bool = False,
                        **kwargs) -> None:
        """transformers' ``save_pretrained`` (every option), writing the official layout and this modeling code.

        The files are written to a temporary folder beside ``save_directory`` and moved in at the end, so an
        interrupted save leaves an earlier checkpoint there intact; weight files of the same name family that the
        new save does not contain (stale shards) are removed. ``save_original_format=False`` writes transformers'
        fused layout (``model.*``) instead. ``push_to_hub=True`` uploads the saved folder afterwards (transformers'
        ``push_to_hub`` options: ``repo_id``, ``private``, ``token``, ``commit_message``, ...).
        """
        if not is_main_process:
            return super().save_pretrained(save_directory, *args, is_main_process=False, **kwargs)
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise ValueError(f"{target} exists and is not a directory; choose another save_directory.")
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "private", "commit_message", "create_pr", "revision",
                                                  "commit_description", "tags") if k in kwargs}
        token = kwargs.get("token")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.config.auto_map = dict(AUTO_MAP)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=str(target.parent)))
        try:
            super().save_pretrained(str(tmp), *args, is_main_process=True, push_to_hub=False, **kwargs)
            _move_into(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", target.name)
            if self.hub_uploader is not None:  # the package's `publish`: folder checks + model card + upload
                self.hub_uploader(target, repo_id, private=bool(hub_kwargs.pop("private", False)), token=token,
                                  commit_message=hub_kwargs.pop("commit_message", None))
                return
            from huggingface_hub import HfApi  # remote code without the package: a plain upload

            api = HfApi(token=token)
            repo = api.create_repo(repo_id, private=hub_kwargs.pop("private", None), exist_ok=True)
            api.upload_folder(repo_id=repo.repo_id, folder_path=str(target),
                              commit_message=hub_kwargs.pop("commit_message", None) or "Upload Nemotron 3 model",
                              **{k: v for k, v in hub_kwargs.items() if k in ("create_pr", "revision",
                                                                             "commit_description")})


def _move_into(tmp: Path, target: Path) -> None:
    """Move the finished files of ``tmp`` into ``target`` (each rename atomic), removing stale weight files of the
    families just written (e.g. old shards of ``model-*.safetensors`` when the new save has fewer)."""
    import re

    target.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in tmp.iterdir()}

    def family(name: str) -> str | None:
        if not name.endswith((".safetensors", ".bin", ".index.json")):
            return None
        return re.sub(r"-\d{5}-of-\d{5}", "", name).replace(".index.json", "")

    families = {family(n) for n in new} - {None}
    for old in target.iterdir():
        if old.name not in new and old.is_file() and family(old.name) in families:
            old.unlink()
    for item in tmp.iterdir():
        dest = target / item.name
        if dest.is_dir() and not item.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)


class Nemotron3Model(Nemotron3PreTrainedModel):
    """Embeddings, the hybrid stack of blocks, final RMSNorm."""

    _keys_to_ignore_on_load_unexpected = [r"^mtp\.", r"^lm_head\."]

    def __init__(self, config: Nemotron3Config) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        self.layers = nn.ModuleList(
            Nemotron3Block(config, i, kind) for i, kind in enumerate(config.layers_block_type)
        )
        self.norm_f = Nemotron3RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def mask_args(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
        past: int, seq_idx: torch.Tensor | None,
    ) -> dict:
        """Masks shared by all layers of one forward: padding for Mamba, one boolean mask for attention."""
        b, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        padding = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"attention_mask must be a 2-D [batch, length] padding mask, got shape {tuple(attention_mask.shape)}; "
                    "Nemotron 3 builds its causal masks itself."
                )
            padding = attention_mask.bool()
            if bool(padding.all()):
                padding = None
        kv_len = past + length
        if padding is not None and padding.shape[1] != kv_len:
            raise ValueError(
                f"attention_mask covers {padding.shape[1]} tokens but cache + input hold {kv_len}; pass the mask "
                "of the whole sequence so far."
            )
        if seq_idx is None and position_ids is not None and attention_mask is None and past == 0 and length > 1:
            seq_idx = seq_idx_from_position_ids(position_ids)
        if position_ids is None:
            if padding is not None:
                position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past, kv_len, device=device)[None].expand(b, -1)
        return {
            "attn_mask": build_attention_mask(padding, seq_idx, length, kv_len, device),
            "padding_mask": padding[:, -length:] if padding is not None else None,
            "padding_mask_2d": padding,
            "seq_idx": seq_idx,
            "position_ids": position_ids,
        }

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Nemotron3HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        seq_idx: torch.Tensor | None = None,
        **kwargs,
    ) -> Nemotron3ModelOutput:
        """Run the backbone. ``seq_idx`` [b, l] (or restarting ``position_ids`` without a mask) packs sequences.

        ``output_hidden_states`` / ``output_attentions`` / ``output_router_logits`` and ``return_dict`` (arguments
        or config) are handled by transformers' output capturing; ``cache`` is any transformers `Cache` holding
        this model's layers (`Nemotron3HybridCache` is created when ``use_cache`` and none is given).
        """
        cache = _pop_cache(kwargs, cache)
        recording = any(kwargs.get(f"output_{k}", getattr(self.config, f"output_{k}", False))
                        for k in ("hidden_states", "attentions", "router_logits"))
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if use_cache and cache is None:
            cache = Nemotron3HybridCache(self.config, inputs_embeds.shape[0], inputs_embeds.dtype, inputs_embeds.device)
        check_cache(cache)
        past = seq_length(cache)
        args = self.mask_args(inputs_embeds, attention_mask, position_ids, past, seq_idx)
        # other keyword arguments reach every mixer (e.g. context parallelism's `context_parallel` for its kernels)
        layer_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("output_") and k != "return_dict"}
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cache=cache, **args, **layer_kwargs)
        hidden = self.norm_f(hidden)
        return self._output(hidden, cache if use_cache else None)

    def _moe_layers(self) -> list[Nemotron3MoE]:
        return [layer.mixer for layer in self.layers if isinstance(layer.mixer, Nemotron3MoE)]

    def router_logits(self) -> tuple[torch.Tensor, ...] | None:
        """The router logits of the MoE layers from the last forward, or None without MoE layers."""
        moe = self._moe_layers()
        return tuple(m.last_router_logits for m in moe) if moe else None

    def _output(self, hidden: torch.Tensor, cache) -> Nemotron3ModelOutput:
        aux = [m.last_aux_loss for m in self._moe_layers() if m.last_aux_loss is not None]
        return Nemotron3ModelOutput(
            last_hidden_state=hidden, **{CACHE_FIELD: cache}, aux_loss=torch.stack(aux).sum() if aux else None,
        )


def check_cache(cache) -> None:
    """Reject caches the model cannot use, naming the fix (rather than computing with them wrongly)."""
    if cache is None or isinstance(cache, Nemotron3HybridCache):
        return
    from transformers.cache_utils import Cache, StaticLayer

    if not isinstance(cache, Cache):
        raise ValueError(f"`cache` must be a transformers Cache, got {type(cache).__name__}; pass "
                         "`Nemotron3HybridCache(model.config, batch_size)`, `DynamicCache(config=model.config)` or none.")
    if any(isinstance(layer, StaticLayer) for layer in cache.layers):
        raise ValueError("Static caches are not supported by Nemotron 3 (its attention layers need the dynamic "
                         "hybrid cache); drop `cache_implementation='static'` / the StaticCache and use the default.")


class Nemotron3ForCausalLM(Nemotron3PreTrainedModel, GenerationMixin):
    """Nemotron 3 causal LM: backbone, untied ``lm_head``, optional MTP head and its training loss."""

    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    # tied only when config.tie_word_embeddings is true (the official checkpoints are untied)
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # Seam for whole-step decoding backends (None: the modules run). Called on a plain cached inference step as
    # ``decode_backend(model, input_ids, inputs_embeds, attention_mask, cache, seq_idx)`` -> (hidden after the
    # final norm, fp32 logits) or None, and by the MTP head as ``decode_backend.mtp_blocks(mtp, x, cache,
    # mask_args)``. The package's CPU kernels install one per model (`enable_cpu_kernels(model)`).
    decode_backend = None

    def __init__(self, config: Nemotron3Config) -> None:
        super().__init__(config)
        self.model = Nemotron3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = Nemotron3MTP(config) if config.num_nextn_predict_layers > 0 else None
        self.post_init()

    # --- accessors transformers / TRL use
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> Nemotron3Model:
        return self.model

    @property
    def loss_function(self):
        """transformers' loss lookup (a loss set on the model, else ``LOSS_MAPPING[self.loss_type]``), except that
        the default causal-LM loss is `loss.causal_lm_loss`: the same contract and value as ``ForCausalLMLoss``,
        with a row-blocked cross entropy that keeps no ``[tokens, vocab]`` tensor of its own (faster on CPU)."""
        if not hasattr(self, "_loss_function") and getattr(self, "loss_type", None) == "ForCausalLM":
            return causal_lm_loss
        return super().loss_function

    @loss_function.setter
    def loss_function(self, value) -> None:
        self._loss_function = value

    @property
    def backbone(self) -> Nemotron3Model:
        """The backbone under its official-checkpoint name (``model`` in memory, ``backbone.*`` on disk)."""
        return self.model

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Nemotron3HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        seq_idx: torch.Tensor | None = None,
        **kwargs,
    ) -> Nemotron3CausalLMOutput:
        """Logits for the kept positions; with ``labels`` (shifted inside, -100 ignored) or ``shift_labels``
        (already shifted, e.g. by context parallelism) the loss: LM + MoE aux + ``mtp_loss_scale`` * MTP.

        Other keyword arguments follow transformers: ``output_hidden_states``, ``output_attentions``,
        ``output_router_logits``, ``return_dict`` (defaults from the config), ``num_items_in_batch``."""
        cache = _pop_cache(kwargs, cache)
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
        want_router = kwargs.get("output_router_logits", self.config.output_router_logits)
        recording = any(kwargs.get(f"output_{k}", getattr(self.config, f"output_{k}", False))
                        for k in ("hidden_states", "attentions"))
        wants_loss = labels is not None or loss_kwargs.get("shift_labels") is not None
        if (self.decode_backend is not None and not wants_loss and not recording and isinstance(logits_to_keep, int)
                and logits_to_keep <= 1 and use_cache is not False):
            fused = self.decode_backend(self, input_ids, inputs_embeds, attention_mask, cache, seq_idx)
            if fused is not None:  # a whole decode step through the backend (e.g. the CPU kernels' CpuDecoder)
                hidden, logits = fused
                if logits_to_keep == 1 and logits.shape[1] > 1:
                    logits = logits[:, -1:]
                return Nemotron3CausalLMOutput(logits=logits, **{CACHE_FIELD: cache}, last_hidden_state=hidden,
                                               router_logits=self.model.router_logits() if want_router else None)
        kwargs["output_router_logits"] = want_router
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, seq_idx=seq_idx, return_dict=True, **kwargs,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.lm_head(kept).float()
        loss = lm_loss = mtp_loss = None
        if wants_loss:
            if logits.shape[1] != hidden.shape[1]:
                raise ValueError("`labels` need logits for every position; call with logits_to_keep=0.")
            targets = _shifted_targets(labels, loss_kwargs.pop("shift_labels", None))
            lm_loss = self.loss_function(logits, None, self.config.vocab_size, shift_labels=targets, **loss_kwargs)
            loss = lm_loss
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            if self.mtp is not None and self.training and self.config.mtp_loss_scale > 0:
                mtp_loss = self.mtp_loss(hidden, input_ids, inputs_embeds, targets, attention_mask, seq_idx,
                                         position_ids, **loss_kwargs)
                loss = loss + self.config.mtp_loss_scale * mtp_loss
        return Nemotron3CausalLMOutput(
            loss=loss, logits=logits, **{CACHE_FIELD: out[CACHE_FIELD] if CACHE_FIELD in out else None},
            hidden_states=out.hidden_states, attentions=out.attentions,
            router_logits=out.router_logits if want_router else None,
            aux_loss=out.aux_loss, lm_loss=lm_loss, mtp_loss=mtp_loss, last_hidden_state=hidden,
        )

    # ------------------------------------------------------------------ MTP
    def mtp_loss(self, hidden, input_ids, inputs_embeds, targets, attention_mask, seq_idx, position_ids, **kw):
        """Mean over depths d = 1..mtp_num_depths of the loss of predicting token t+1+d from position t.

        ``targets`` are the shifted labels (``targets[t]`` is the token after t, -100 ignored)."""
        if self.mtp is None:
            raise ValueError("This model has no MTP head (`num_nextn_predict_layers` is 0).")
        embeds = inputs_embeds if inputs_embeds is not None else self.model.embeddings(input_ids)
        args = self.model.mask_args(embeds, attention_mask, position_ids, 0, seq_idx)
        h = hidden
        losses = []
        shifted = targets
        for depth in range(1, self.config.mtp_num_depths + 1):
            # the token after position t at depth d is t+d; shift embeddings left by d (zeros at the end)
            next_embeds = torch.roll(embeds, shifts=-depth, dims=1)
            next_embeds[:, -depth:] = 0
            h, normed = self.mtp(h, next_embeds, cache=None, mask_args=args)
            logits = self.lm_head(normed).float()
            shifted = torch.roll(shifted, shifts=-1, dims=1)
            shifted[:, -1:] = -100
            losses.append(self.loss_function(logits, None, self.config.vocab_size, shift_labels=shifted, **kw))
        return torch.stack(losses).mean()

    def mtp_draft_logits(self, hidden: torch.Tensor, next_token_ids: torch.LongTensor, cache=None,
                         mask_args: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits for token t+2 from hidden state at t and token t+1. Returns (logits, MTP hidden)."""
        if self.mtp is None:
            raise ValueError("This model has no MTP head (`num_nextn_predict_layers` is 0).")
        out_hidden, normed = self.mtp(hidden, self.model.embeddings(next_token_ids), cache=cache,
                                      mask_args=mask_args, decode_backend=self.decode_backend)
        return self.lm_head(normed).float(), out_hidden

    # ------------------------------------------------------------------ MoE training hooks
    def update_expert_bias(self, rate: float | None = None) -> None:
        """Aux-loss-free balancing: nudge ``e_score_correction_bias`` toward under-loaded experts.

        Uses the expert loads counted since the last call (training forwards only), then resets them.
        ``bias += rate * sign(mean_load - load)``; rate defaults to ``config.moe_bias_update_rate``.
        """
        rate = self.config.moe_bias_update_rate if rate is None else rate
        for module in self.modules():
            if isinstance(module, Nemotron3Router) and module.expert_load is not None:
                load = module.expert_load
                if rate > 0:
                    module.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
                module.expert_load = None

    # ------------------------------------------------------------------ generation
    def generate(self, inputs: torch.Tensor | None = None, *args, use_mtp: bool = False, num_draft_tokens: int = 3,
                 **kwargs):
        """transformers' ``generate``; with ``use_mtp=True``, greedy MTP self-speculative decoding instead.

        ``use_mtp=True`` drafts ``num_draft_tokens`` tokens per round with the MTP head and verifies them in one
        forward of the main model; the output equals plain greedy decoding. It supports one unpadded sequence,
        ``max_new_tokens``, ``eos_token_id`` and ``do_sample=False`` only (see ``speculative.mtp_generate``).
        """
        if not use_mtp:
            return super().generate(inputs, *args, **kwargs)
        from .speculative import mtp_generate

        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        gen = kwargs.pop("generation_config", None) or self.generation_config
        max_new_tokens = kwargs.pop("max_new_tokens", None) or gen.max_new_tokens
        eos = kwargs.pop("eos_token_id", gen.eos_token_id)
        mask = kwargs.pop("attention_mask", None)
        for key in ("pad_token_id", "use_cache"):
            kwargs.pop(key, None)
        if kwargs.pop("do_sample", False) or gen.do_sample or gen.num_beams not in (None, 1):
            raise ValueError("use_mtp=True decodes greedily; pass do_sample=False and num_beams=1, or drop use_mtp.")
        if args or kwargs:
            raise ValueError(f"use_mtp=True does not support {sorted(kwargs) or 'positional'} arguments; "
                             "use plain generate() for them.")
        if input_ids is None or max_new_tokens is None:
            raise ValueError("use_mtp=True needs input_ids and max_new_tokens.")
        if mask is not None and not bool(mask.all()):
            raise ValueError("use_mtp=True decodes one unpadded sequence; drop the padding.")
        return mtp_generate(self, input_ids, max_new_tokens, num_draft_tokens=num_draft_tokens, eos_token_id=eos)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                      max_cache_length: int):
        """The default generation cache is `Nemotron3HybridCache`; a cache passed in is used as given (checked in
        forward); other ``cache_implementation`` values are refused with the reason."""
        if (model_kwargs.get("cache") is not None or generation_config.use_cache is False
                or getattr(generation_config, "cache_implementation", None) not in (None, "dynamic")):
            if getattr(generation_config, "cache_implementation", None) not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported by Nemotron 3: "
                    "its Mamba-2 and attention layers share the dynamic hybrid cache. Drop the option (the default "
                    "cache is used) or pass `cache=Nemotron3HybridCache(model.config, batch_size)`."
                )
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode,
                                                          batch_size, max_cache_length)
        rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
        model_kwargs["cache"] = Nemotron3HybridCache(self.config, rows, self.dtype, self.device)
        if getattr(generation_config, "is_assistant", False):
            model_kwargs["cache"].activate_past_recording(
                recurrent_states_to_keep=generation_config.num_assistant_tokens)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        """Feed the tokens the cache has not seen; on the first step ``inputs_embeds`` if given. Other keyword
        arguments (e.g. ``output_attentions``, ``seq_idx``) are passed on to ``forward``."""
        cache = _pop_cache(kwargs, None)
        past = seq_length(cache)
        if cache is None and kwargs.get("use_cache", True) is not False:
            cache = Nemotron3HybridCache(self.config, input_ids.shape[0], self.dtype, input_ids.device)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the same as no mask, and decode steps skip checking it again
        internal = ("position_ids", "cache_position", "logits_to_keep", "next_sequence_length", "is_first_iteration")
        inputs = {k: v for k, v in kwargs.items() if k not in internal}
        inputs.update({"cache": cache, "attention_mask": attention_mask, "use_cache": cache is not None})
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
            new = inputs_embeds.shape[1]
        else:
            # with a prompt given as embeddings, generate says how many tokens are new (`input_ids` may or may not
            # hold the prompt: transformers accepts `input_ids` and `inputs_embeds` together)
            next_len = kwargs.get("next_sequence_length")
            if inputs_embeds is not None and next_len is not None:
                new = next_len
            else:
                total = input_ids.shape[1] + (inputs_embeds.shape[1] if inputs_embeds is not None else 0)
                new = total - past
            inputs["input_ids"] = input_ids[:, input_ids.shape[1] - new:]
        if attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            inputs["position_ids"] = pos[:, -new:]
        keep = kwargs.get("logits_to_keep")
        inputs["logits_to_keep"] = keep if keep is not None else (self.config.num_logits_to_keep or 0)
        return inputs


def _shifted_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """The next-token targets: ``shift_labels`` as given, else ``labels`` shifted left by one (-100 at the end)."""
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


# `save_pretrained` copies this file (and what it imports) next to the weights and writes `auto_map`
Nemotron3Config.register_for_auto_class("AutoConfig")
Nemotron3Model.register_for_auto_class("AutoModel")
Nemotron3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["Nemotron3Model", "Nemotron3ForCausalLM", "Nemotron3PreTrainedModel", "Nemotron3CausalLMOutput",
           "Nemotron3ModelOutput"]
