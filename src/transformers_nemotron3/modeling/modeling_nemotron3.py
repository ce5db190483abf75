"""Nemotron 3 models: `Nemotron3Model` (the backbone) and `Nemotron3ForCausalLM` (backbone + lm_head + MTP).

Parameter names follow the official checkpoints (``backbone.layers.N.mixer...``, ``lm_head``,
``mtp.layers.N...``) except that routed experts are stored as 3-D tensors; `checkpoint_io.py`
converts to and from the one-tensor-per-expert files. This file and its single-dot imports are
copied next to saved weights, so a plain transformers install loads them with ``trust_remote_code``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .fast_ops import Nemotron3Linear
from .fused_decode import cached_plan, decode_ready, fits
from .blocks import Nemotron3Block, Nemotron3RMSNorm
from .cache import Nemotron3HybridCache
from .checkpoint_io import CheckpointMixin
from .configuration_nemotron3 import Nemotron3Config
from .mamba2 import Nemotron3Mamba2Mixer
from .moe import Nemotron3Experts, Nemotron3MoE, Nemotron3Router
from .mtp import Nemotron3MTP

_CACHE_ALIASES = ("cache", "past_key_values", "cache_params")
try:  # transformers >= 5.24 names the generation cache `cache`; earlier 5.x releases `past_key_values`
    from transformers.generation.utils import ALL_CACHE_NAMES as _ALL_CACHE_NAMES
except ImportError:  # pragma: no cover
    _ALL_CACHE_NAMES = ["past_key_values"]
CACHE_FIELD = "cache" if "cache" in _ALL_CACHE_NAMES else "past_key_values"


@dataclass
class Nemotron3ModelOutput(ModelOutput):
    """Backbone output. The cache sits under ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier)."""

    last_hidden_state: torch.Tensor | None = None
    if CACHE_FIELD == "cache":
        cache: Nemotron3HybridCache | None = None
    else:
        past_key_values: Nemotron3HybridCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
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


class Nemotron3PreTrainedModel(CheckpointMixin, PreTrainedModel):
    """Weight init and the flags transformers reads."""

    config_class = Nemotron3Config
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Nemotron3Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _is_stateful = True
    _tied_weights_keys: dict = {}
    _keep_in_fp32_modules = ["gate"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Conv1d):
            bound = 1 / math.sqrt(module.kernel_size[0])
            module.weight.uniform_(-bound, bound)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound)
        elif isinstance(module, Nemotron3RMSNorm) or type(module).__name__ == "GatedRMSNorm":
            module.weight.fill_(1.0)
        elif isinstance(module, Nemotron3Router):
            module.weight.normal_(0.0, std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, Nemotron3Experts):
            for p in (module.up_proj, module.down_proj, module.gate_proj):
                if p is not None:
                    p.normal_(0.0, std)
        elif isinstance(module, Nemotron3Mamba2Mixer):
            c = self.config
            module.A_log.copy_(torch.log(torch.arange(1, c.mamba_num_heads + 1, dtype=torch.float32)))
            module.D.fill_(1.0)
            dt = torch.exp(torch.rand(c.mamba_num_heads) * (math.log(c.time_step_max) - math.log(c.time_step_min))
                           + math.log(c.time_step_min)).clamp(min=c.time_step_floor)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


class Nemotron3Model(Nemotron3PreTrainedModel):
    """Embeddings, the hybrid stack of blocks, final RMSNorm."""

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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Nemotron3HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        seq_idx: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Nemotron3ModelOutput:
        """Run the backbone. ``seq_idx`` [b, l] (or restarting ``position_ids`` without a mask) packs sequences."""
        cache = _pop_cache(kwargs, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if not output_hidden_states:
            fused = self.fused_decode(input_ids, inputs_embeds, attention_mask, cache, seq_idx)
            if fused is not None:
                return self._output(fused[0], cache if use_cache else None, None)
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if use_cache and cache is None:
            cache = Nemotron3HybridCache(self.config, inputs_embeds.shape[0], inputs_embeds.dtype, inputs_embeds.device)
        past = cache.seen_tokens if cache is not None else 0
        args = self.mask_args(inputs_embeds, attention_mask, position_ids, past, seq_idx)
        output_hidden_states = output_hidden_states or False
        hidden = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden = layer(hidden, cache=cache, **args)
        hidden = self.norm_f(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        if cache is not None:
            cache.seen_tokens = past + inputs_embeds.shape[1]
        return self._output(hidden, cache if use_cache else None, all_hidden)

    def _moe_layers(self) -> list[Nemotron3MoE]:
        return [layer.mixer for layer in self.layers if isinstance(layer.mixer, Nemotron3MoE)]

    def router_logits(self) -> tuple[torch.Tensor, ...] | None:
        """The router logits of the MoE layers from the last forward, or None without MoE layers."""
        moe = self._moe_layers()
        return tuple(m.last_router_logits for m in moe) if moe else None

    def _output(self, hidden: torch.Tensor, cache, all_hidden: list | None) -> Nemotron3ModelOutput:
        aux = [m.last_aux_loss for m in self._moe_layers() if m.last_aux_loss is not None]
        return Nemotron3ModelOutput(
            last_hidden_state=hidden,
            **{CACHE_FIELD: cache},
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            router_logits=self.router_logits(),
            aux_loss=torch.stack(aux).sum() if aux else None,
        )

    def fused_decode(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, cache: Nemotron3HybridCache | None,
                     seq_idx: torch.Tensor | None = None, lm_head: nn.Module | None = None):
        """A cached decode step through the CPU kernels in one call: (hidden after the final norm, fp32 logits
        of ``lm_head`` or None) for one token per sequence, or for a few while the Mamba states record
        (speculative verification); None where it does not apply (kernels off, autograd, padding, a block the
        kernels do not cover, ...), and the modules run instead."""
        x = input_ids if input_ids is not None else inputs_embeds
        dtype = self.embeddings.weight.dtype if input_ids is not None else inputs_embeds.dtype
        if (cache is None or not cache.seen_tokens or seq_idx is not None or self.training
                or x.dim() != (2 if input_ids is not None else 3) or not decode_ready(x, dtype)
                or (attention_mask is not None and not bool(attention_mask.all()))
                or type(self.norm_f) is not Nemotron3RMSNorm
                or (input_ids is not None and type(self.embeddings) is not nn.Embedding)
                or (lm_head is not None and not fits(dtype, lm_head))):
            return None
        plan = cached_plan(self, self.layers, cache, dtype, (lm_head.weight,) if lm_head is not None else ())
        if plan is None or not plan.applies(x.shape[1]):
            return None
        if input_ids is not None:
            _, hidden, logits = plan.run(self.embeddings.weight, input_ids, self.norm_f, lm_head)
        else:
            _, hidden, logits = plan.run(inputs_embeds, None, self.norm_f, lm_head)
        cache.seen_tokens += x.shape[1]
        return hidden, logits


class Nemotron3ForCausalLM(Nemotron3PreTrainedModel, GenerationMixin):
    """Nemotron 3 causal LM: backbone, untied ``lm_head``, optional MTP head and its training loss."""

    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: Nemotron3Config) -> None:
        super().__init__(config)
        self.backbone = Nemotron3Model(config)
        self.lm_head = Nemotron3Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = Nemotron3MTP(config) if config.num_nextn_predict_layers > 0 else None
        self.post_init()

    # --- accessors transformers / TRL use
    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> Nemotron3Model:
        return self.backbone

    @property
    def model(self) -> Nemotron3Model:
        """Alias of ``backbone`` for code written against transformers' NemotronH."""
        return self.backbone

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
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        seq_idx: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Nemotron3CausalLMOutput:
        """Logits for the kept positions; with ``labels`` the loss (labels are shifted inside, -100 ignored)."""
        cache = _pop_cache(kwargs, cache)
        if (labels is None and not output_hidden_states and isinstance(logits_to_keep, int) and logits_to_keep <= 1
                and (use_cache is not False)):
            fused = self.backbone.fused_decode(input_ids, inputs_embeds, attention_mask, cache, seq_idx, self.lm_head)
            if fused is not None:  # a decode step through the CPU kernels
                hidden, logits = fused
                if logits_to_keep == 1 and logits.shape[1] > 1:
                    logits = logits[:, -1:]
                want_router = output_router_logits or self.config.output_router_logits
                return Nemotron3CausalLMOutput(logits=logits, **{CACHE_FIELD: cache}, last_hidden_state=hidden,
                                               router_logits=self.backbone.router_logits() if want_router else None)
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            seq_idx=seq_idx,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.lm_head(kept).float()
        loss = lm_loss = mtp_loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("`labels` need logits for every position; call with logits_to_keep=0.")
            lm_loss = self.loss_function(logits, labels, self.config.vocab_size, **_loss_kwargs(kwargs))
            loss = lm_loss
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            if self.mtp is not None and self.training and self.config.mtp_loss_scale > 0:
                mtp_loss = self.mtp_loss(hidden, input_ids, inputs_embeds, labels, attention_mask, seq_idx,
                                         position_ids, **_loss_kwargs(kwargs))
                loss = loss + self.config.mtp_loss_scale * mtp_loss
        return Nemotron3CausalLMOutput(
            loss=loss, logits=logits, **{CACHE_FIELD: out[CACHE_FIELD] if CACHE_FIELD in out else None},
            hidden_states=out.hidden_states,
            router_logits=out.router_logits if (output_router_logits or self.config.output_router_logits) else None,
            aux_loss=out.aux_loss, lm_loss=lm_loss, mtp_loss=mtp_loss, last_hidden_state=hidden,
        )

    # ------------------------------------------------------------------ MTP
    def mtp_loss(self, hidden, input_ids, inputs_embeds, labels, attention_mask, seq_idx, position_ids, **kw):
        """Mean over depths d = 1..mtp_num_depths of the loss of predicting token t+1+d from position t."""
        if self.mtp is None:
            raise ValueError("This model has no MTP head (`num_nextn_predict_layers` is 0).")
        embeds = inputs_embeds if inputs_embeds is not None else self.backbone.embeddings(input_ids)
        args = self.backbone.mask_args(embeds, attention_mask, position_ids, 0, seq_idx)
        h = hidden
        losses = []
        shifted_labels = labels
        for depth in range(1, self.config.mtp_num_depths + 1):
            # the token after position t at depth d is t+d; shift embeddings left by d (zeros at the end)
            next_embeds = torch.roll(embeds, shifts=-depth, dims=1)
            next_embeds[:, -depth:] = 0
            h, normed = self.mtp(h, next_embeds, cache=None, mask_args=args)
            logits = self.lm_head(normed).float()
            shifted_labels = torch.roll(shifted_labels, shifts=-1, dims=1)
            shifted_labels[:, -1:] = -100
            losses.append(self.loss_function(logits, shifted_labels, self.config.vocab_size, **kw))
        return torch.stack(losses).mean()

    def mtp_draft_logits(self, hidden: torch.Tensor, next_token_ids: torch.LongTensor, cache=None,
                         mask_args: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits for token t+2 from hidden state at t and token t+1. Returns (logits, MTP hidden)."""
        if self.mtp is None:
            raise ValueError("This model has no MTP head (`num_nextn_predict_layers` is 0).")
        out_hidden, normed = self.mtp(hidden, self.backbone.embeddings(next_token_ids), cache=cache,
                                      mask_args=mask_args)
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

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own hybrid cache (created in prepare_inputs_for_generation)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        cache = _pop_cache(kwargs, None)
        past = cache.seen_tokens if cache is not None else 0
        if cache is None:
            batch = input_ids.shape[0]
            cache = Nemotron3HybridCache(self.config, batch, self.dtype, input_ids.device)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the same as no mask, and decode steps skip checking it again
        inputs = {"cache": cache, "attention_mask": attention_mask, "use_cache": True}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:]
        new = (inputs.get("input_ids") if "input_ids" in inputs else inputs_embeds).shape[1]
        if attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            inputs["position_ids"] = pos[:, -new:]
        keep = kwargs.get("logits_to_keep")
        inputs["logits_to_keep"] = keep if keep is not None else (self.config.num_logits_to_keep or 0)
        return inputs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache


def _loss_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index")}


__all__ = ["Nemotron3Model", "Nemotron3ForCausalLM", "Nemotron3PreTrainedModel", "Nemotron3CausalLMOutput",
           "Nemotron3ModelOutput"]
