"""Configuration of Nemotron 3 (hybrid Mamba-2 / attention / MoE) models.

`Nemotron3Config` reads every official ``nemotron_h`` ``config.json`` (Nano 30B-A3B, Super 120B-A12B with
LatentMoE and MTP, dense Nemotron-H such as Nano-9B-v2), both spellings of the Mamba keys
(``n_groups`` / ``mamba_n_groups`` ...), the ``hybrid_override_pattern`` string and the list form that
transformers' native config writes (``layers_block_type``). Every invalid value raises a ``ValueError``
naming the key and the fix.

This file is exported next to saved weights for ``trust_remote_code``: it imports only the standard
library, torch, transformers and, for the block kinds and their pattern letters, the block table (blocks.py).
"""

from __future__ import annotations

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

# Other spellings accepted in `layers_block_type` / `layer_types` (the 5.3-era native names); every block kind is
# also accepted under its own name.
BLOCK_NAME_ALIASES = {"mamba": "linear_attention", "attention": "full_attention"}


def block_letters() -> dict[str, str]:
    """``hybrid_override_pattern`` letter -> block kind, read from the block table (``MIXER_TYPES`` in blocks.py:
    each mixer class names its ``pattern_char``), so a new kind needs no entry here."""
    from .blocks import MIXER_TYPES

    letters: dict[str, str] = {}
    for kind, cls in MIXER_TYPES.items():
        char = getattr(cls, "pattern_char", None)
        if not isinstance(char, str) or len(char) != 1 or char in letters:
            raise ValueError(f"block kind {kind!r}: its mixer class {cls.__name__} must set `pattern_char` to one "
                             f"character not used by another kind (got {char!r}; taken: {sorted(letters)}).")
        letters[char] = kind
    return letters


def pattern_of(blocks: list[str]) -> str:
    """The one-letter-per-layer pattern of a list of block kinds."""
    letter = {kind: char for char, kind in block_letters().items()}
    return "".join(letter[b] for b in blocks)


# Legacy constructor names of NVIDIA's remote config -> the JSON keys we store.
LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
}
ROUTER_SCORE_FUNCTIONS = ("sigmoid", "softmax", "topk_softmax")
ACTIVATIONS = ("relu2", "silu", "gelu", "relu")
# RoPE scaling kinds of `rope_scaling_params` and the keys each needs (names as in transformers' rope_parameters).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _as_float(value: Any) -> float:
    """A float from JSON, including transformers' ``{"__float__": "Infinity"}`` encoding of inf."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def parse_block_types(value: str | list[str], key: str) -> list[str]:
    """Turn a pattern string (``"MEM*E"``) or a list of block names into our block names."""
    letters = block_letters()
    if isinstance(value, str):
        bad = sorted({c for c in value if c not in letters})
        if bad:
            known = ", ".join(f"{c!r} ({kind})" for c, kind in letters.items())
            raise ValueError(f"`{key}` contains unknown layer character(s) {bad} in {value!r}; use only {known}.")
        return [letters[c] for c in value]
    if isinstance(value, (list, tuple)):
        names = {**{kind: kind for kind in letters.values()}, **BLOCK_NAME_ALIASES}
        out = []
        for name in value:
            if name not in names:
                raise ValueError(f"`{key}` contains unknown layer type {name!r}; use one of {sorted(names)}.")
            out.append(names[name])
        return out
    raise ValueError(f"`{key}` must be a pattern string like 'MEM*E' or a list of layer types, got {value!r}.")


def _normalize_rope_scaling(value: Any) -> dict[str, Any] | None:
    """Validate a ``rope_scaling_params`` dict; return a clean copy (floats, int context length) or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"`rope_scaling_params` must be a dict like {{'rope_type': 'llama3', 'factor': 8.0, ...}} "
                         f"or null, got {value!r}.")
    d = dict(value)
    if "type" in d and "rope_type" not in d:  # the pre-4.45 transformers spelling
        d["rope_type"] = d.pop("type")
    kind = d.get("rope_type")
    if kind in (None, "default"):
        extra = sorted(k for k in d if k not in ("rope_type", "type"))
        if extra:
            raise ValueError(f"`rope_scaling_params` has rope_type {kind!r} (no scaling) but also keys {extra}; "
                             "drop them or name a scaling rope_type.")
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"`rope_scaling_params['rope_type']`={kind!r} is not supported; use one of "
                         f"{sorted(ROPE_SCALING_KEYS)} (yarn and longrope are not implemented).")
    required = ROPE_SCALING_KEYS[kind]
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"`rope_scaling_params` with rope_type {kind!r} needs the key(s) {missing}.")
    unknown = sorted(k for k in d if k not in required + ("rope_type",))
    if unknown:
        raise ValueError(f"`rope_scaling_params` has unknown key(s) {unknown} for rope_type {kind!r}; allowed: "
                         f"{list(required)} (rope_theta and partial_rotary_factor are top-level config keys).")
    out: dict[str, Any] = {"rope_type": kind}
    for key in required:
        try:
            out[key] = int(d[key]) if key == "original_max_position_embeddings" else float(d[key])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"`rope_scaling_params['{key}']`={d[key]!r} must be a number.") from exc
    return out


@strict
class Nemotron3Config(PretrainedConfig):
    """Configuration of a Nemotron 3 model.

    Official keys keep their official names and defaults follow transformers' native `NemotronHConfig`.
    Options beyond the official checkpoints (all off by default, as in Nemotron 3):

    - ``use_rope``: rotary position embeddings on attention (``rope_theta``, ``partial_rotary_factor``),
      used by models upcycled from Llama-family checkpoints.
    - ``rope_scaling_params``: RoPE frequency scaling, a dict with ``rope_type`` ``"linear"`` / ``"dynamic"``
      (key ``factor``) or ``"llama3"`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``), as in transformers' ``rope_parameters``; null = plain RoPE.
      Needs ``use_rope``. (Not named ``rope_scaling``: transformers' base config owns that name as an alias of
      its own ``rope_parameters``; a ``rope_scaling=`` keyword is accepted and stored here.)
    - ``attention_qk_norm``: per-head RMSNorm of queries and keys before RoPE (Qwen3's ``q_norm``/``k_norm``,
      parameters ``mixer.q_norm.weight`` / ``mixer.k_norm.weight`` of ``head_dim`` each, eps
      ``layer_norm_epsilon``).
    - ``moe_gated_experts``: SwiGLU experts ``down(silu(gate(x)) * up(x))`` instead of relu² experts
      (``moe_expert_act`` picks the gate activation).
    - ``moe_router_score_function``: ``"sigmoid"`` (Nemotron 3), ``"softmax"`` (softmax over all experts,
      then top-k) or ``"topk_softmax"`` (top-k of the logits, then softmax over the k).
    - ``moe_aux_loss_coef``: sequence-level load-balancing loss coefficient (0 disables it);
      ``moe_bias_update_rate``: step of the aux-loss-free ``e_score_correction_bias`` update.
    - ``mtp_loss_scale``: weight of the multi-token-prediction loss; ``mtp_num_depths``: how many times the
      single MTP block is applied recursively during training (Super/Ultra train with 2).
    """

    model_type = "nemotron3"
    keys_to_ignore_at_inference = ["cache"]
    # the official checkpoints' model type (what config.json says); read silently by this class
    checkpoint_model_type = "nemotron_h"
    # transformers' tensor- and expert-parallel plans, as native NemotronH's (Mamba layers stay replicated)
    base_model_tp_plan = {
        "embeddings": "embedding_rowwise",
        "layers.*.mixer.q_proj": "colwise",
        "layers.*.mixer.k_proj": "colwise",
        "layers.*.mixer.v_proj": "colwise",
        "layers.*.mixer.o_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mixer.experts.up_proj": "grouped_gemm",
        "layers.*.mixer.experts.down_proj": "grouped_gemm",
        "layers.*.mixer.experts": "ep_dispatch_experts",
    }

    def __init__(
        self,
        vocab_size: int = 131072,
        hidden_size: int = 4096,
        hybrid_override_pattern: str | list[str] | None = None,
        layers_block_type: list[str] | None = None,
        num_hidden_layers: int | None = None,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        num_logits_to_keep: int | None = 1,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 8,
        head_dim: int | None = 128,
        max_position_embeddings: int = 4096,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        sliding_window: int | None = None,
        intermediate_size: int = 21504,
        mlp_hidden_act: str = "relu2",
        mlp_bias: bool = False,
        use_mamba_kernels: bool = True,
        ssm_state_size: int = 128,
        mamba_num_heads: int = 128,
        mamba_head_dim: int = 64,
        mamba_hidden_act: str = "silu",
        n_groups: int = 8,
        conv_kernel: int = 4,
        expand: int = 2,
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_limit: list[float] | tuple[float, float] = (0.0, float("inf")),
        time_step_floor: float = 1e-4,
        use_conv_bias: bool = True,
        chunk_size: int = 128,
        mamba_proj_bias: bool = False,
        mamba_ssm_cache_dtype: str = "float32",
        n_routed_experts: int = 8,
        n_shared_experts: int = 1,
        moe_intermediate_size: int = 7688,
        moe_shared_expert_intermediate_size: int = 7688,
        moe_latent_size: int | None = None,
        moe_shared_expert_overlap: bool = True,
        num_experts_per_tok: int = 2,
        routed_scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        num_nextn_predict_layers: int = 0,
        mtp_hybrid_override_pattern: str | list[str] | None = None,
        mtp_layers_block_type: list[str] | None = None,
        use_bias: bool = False,
        initializer_range: float = 0.02,
        layer_norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = False,
        hidden_dropout: float = 0.0,
        rescale_prenorm_residual: bool = True,
        rope_theta: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        output_router_logits: bool = False,
        # --- options beyond the official checkpoints ---
        use_rope: bool = False,
        rope_scaling_params: dict[str, Any] | None = None,
        attention_qk_norm: bool = False,
        moe_gated_experts: bool = False,
        moe_expert_act: str = "silu",
        moe_router_score_function: str = "sigmoid",
        moe_aux_loss_coef: float = 0.0,
        moe_bias_update_rate: float = 0.0,
        mtp_loss_scale: float = 0.3,
        mtp_num_depths: int = 1,
        **kwargs: Any,
    ) -> None:
        # NVIDIA's remote config takes `mamba_n_groups=...` as constructor names; as in transformers'
        # native config, such a legacy spelling overrides the JSON key.
        mamba = dict(n_groups=n_groups, conv_kernel=conv_kernel, expand=expand, time_step_min=time_step_min,
                     time_step_max=time_step_max, time_step_limit=time_step_limit, time_step_floor=time_step_floor,
                     use_conv_bias=use_conv_bias, chunk_size=chunk_size)
        for legacy, new in LEGACY_KEYS.items():
            if legacy in kwargs:
                mamba[new] = kwargs.pop(legacy)
        layer_types = kwargs.pop("layer_types", None)
        legacy_rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling_params is None and legacy_rope_scaling is not None:
            rope_scaling_params = legacy_rope_scaling
        if layers_block_type is None:
            layers_block_type = layer_types
        # Keys of other implementations that carry no information for us.
        for key in ("norm_eps", "num_local_experts", "_name_or_path_unused"):
            kwargs.pop(key, None)

        if hybrid_override_pattern is not None:
            blocks = parse_block_types(hybrid_override_pattern, "hybrid_override_pattern")
        elif layers_block_type is not None:
            blocks = parse_block_types(layers_block_type, "layers_block_type")
        else:
            blocks = parse_block_types("M*-E", "hybrid_override_pattern")
        if num_hidden_layers is not None and num_hidden_layers != len(blocks):
            raise ValueError(
                f"`num_hidden_layers`={num_hidden_layers} does not match the {len(blocks)} layers of "
                f"`hybrid_override_pattern` {pattern_of(blocks)!r}; make the pattern "
                "one character per layer or drop `num_hidden_layers`."
            )
        mtp_source = mtp_hybrid_override_pattern if mtp_hybrid_override_pattern is not None else mtp_layers_block_type
        mtp_blocks = parse_block_types(mtp_source if mtp_source is not None else "*E", "mtp_hybrid_override_pattern")
        # transformers' base first: its own validators then run before our layer list exists (they reject the
        # `mlp` kind, which this class's `validate_layer_type` allows, as native NemotronH's does)
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )


        self.vocab_size = vocab_size
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.hidden_size = hidden_size
        self.layers_block_type = blocks
        self.num_hidden_layers = len(blocks)
        self.num_logits_to_keep = num_logits_to_keep
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        self.intermediate_size = intermediate_size
        self.mlp_hidden_act = mlp_hidden_act
        self.mlp_bias = mlp_bias
        self.use_mamba_kernels = use_mamba_kernels
        self.ssm_state_size = ssm_state_size
        self.mamba_num_heads = mamba_num_heads
        self.mamba_head_dim = mamba_head_dim
        self.mamba_hidden_act = mamba_hidden_act
        self.n_groups = mamba["n_groups"]
        self.conv_kernel = mamba["conv_kernel"]
        self.expand = mamba["expand"]
        self.time_step_min = mamba["time_step_min"]
        self.time_step_max = mamba["time_step_max"]
        self.time_step_limit = tuple(_as_float(v) for v in mamba["time_step_limit"])
        self.time_step_floor = mamba["time_step_floor"]
        self.use_conv_bias = mamba["use_conv_bias"]
        self.chunk_size = mamba["chunk_size"]
        self.mamba_proj_bias = mamba_proj_bias
        self.mamba_ssm_cache_dtype = mamba_ssm_cache_dtype
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.moe_latent_size = moe_latent_size
        self.moe_shared_expert_overlap = moe_shared_expert_overlap
        self.num_experts_per_tok = num_experts_per_tok
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.mtp_layers_block_type = mtp_blocks
        self.use_bias = use_bias
        self.initializer_range = initializer_range
        self.layer_norm_epsilon = layer_norm_epsilon
        self.residual_in_fp32 = residual_in_fp32
        self.hidden_dropout = hidden_dropout
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.output_router_logits = output_router_logits
        self.use_rope = use_rope
        self.rope_scaling_params = _normalize_rope_scaling(rope_scaling_params)
        self.attention_qk_norm = attention_qk_norm
        self.moe_gated_experts = moe_gated_experts
        self.moe_expert_act = moe_expert_act
        self.moe_router_score_function = moe_router_score_function
        self.moe_aux_loss_coef = moe_aux_loss_coef
        self.moe_bias_update_rate = moe_bias_update_rate
        self.mtp_loss_scale = mtp_loss_scale
        self.mtp_num_depths = mtp_num_depths
        self.check_values()

    # ------------------------------------------------------------------ derived values
    @property
    def layer_types(self) -> list[str]:
        """Alias of ``layers_block_type`` (as in native NemotronH): ``linear_attention`` (Mamba-2), ``full_attention``,
        ``moe``, ``mlp`` per layer, read by transformers' caches (``DynamicCache(config=...)``) and masks."""
        return list(self.layers_block_type)

    def validate_layer_type(self) -> None:
        """transformers' layer-type check, with this family's ``mlp`` kind allowed (as native NemotronH does)."""
        allowed = set(block_letters().values())
        types = self.__dict__.get("layers_block_type")
        if types is None:  # transformers' base init validates before this class has set its layers
            return
        bad = sorted(set(types) - allowed)
        if bad:
            raise ValueError(f"layer types {bad} are not Nemotron 3 block kinds; use {sorted(allowed)}.")

    @property
    def mtp_layer_types(self) -> list[str]:
        """The MTP head's layer kinds in transformers' vocabulary."""
        return list(self.mtp_layers_block_type)

    @property
    def hybrid_override_pattern(self) -> str:
        """The layer pattern as the official one-character-per-layer string."""
        return pattern_of(self.layers_block_type)

    @hybrid_override_pattern.setter
    def hybrid_override_pattern(self, value: str | list[str]) -> None:
        self.layers_block_type = parse_block_types(value, "hybrid_override_pattern")
        self.num_hidden_layers = len(self.layers_block_type)

    @property
    def mtp_hybrid_override_pattern(self) -> str:
        """The MTP block pattern as a string (``"*E"`` for Super/Ultra)."""
        return pattern_of(self.mtp_layers_block_type)

    @mtp_hybrid_override_pattern.setter
    def mtp_hybrid_override_pattern(self, value: str | list[str]) -> None:
        self.mtp_layers_block_type = parse_block_types(value, "mtp_hybrid_override_pattern")

    @property
    def mamba_intermediate_size(self) -> int:
        """d_inner = mamba_num_heads * mamba_head_dim."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the depthwise convolution: x | B | C."""
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    @property
    def num_experts(self) -> int:
        """Alias read by TRL / transformers MoE utilities."""
        return self.n_routed_experts

    @property
    def router_aux_loss_coef(self) -> float:
        """Alias of ``moe_aux_loss_coef`` read and written by transformers' Trainer and TRL."""
        return self.moe_aux_loss_coef

    @router_aux_loss_coef.setter
    def router_aux_loss_coef(self, value: float) -> None:
        self.moe_aux_loss_coef = float(value)

    # ------------------------------------------------------------------ validation
    def check_values(self) -> None:
        """Check every value; raise ValueError naming the key and the fix (run when the config is built)."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for key in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim", "mamba_num_heads",
                    "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size"):
            value = getattr(self, key)
            need(isinstance(value, int) and value > 0, f"`{key}` must be a positive integer, got {value!r}.")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"`num_attention_heads`={self.num_attention_heads} is not divisible by `num_key_value_heads`="
            f"{self.num_key_value_heads}; choose key/value heads that divide the query heads (GQA).",
        )
        need(
            self.mamba_num_heads % self.n_groups == 0,
            f"`mamba_num_heads`={self.mamba_num_heads} is not divisible by `n_groups`={self.n_groups}; "
            "each B/C group must serve a whole number of Mamba heads.",
        )
        lo, hi = self.time_step_limit
        need(0.0 <= lo < hi, f"`time_step_limit`={self.time_step_limit} must be (low, high) with 0 <= low < high.")
        need(self.mamba_ssm_cache_dtype in ("float32", "bfloat16", "float16"),
             f"`mamba_ssm_cache_dtype`={self.mamba_ssm_cache_dtype!r}; use 'float32' (recommended), "
             "'bfloat16' or 'float16'.")
        for key in ("mlp_hidden_act", "moe_expert_act"):
            need(getattr(self, key) in ACTIVATIONS, f"`{key}`={getattr(self, key)!r} is not supported; use one of {ACTIVATIONS}.")
        need(self.mamba_hidden_act == "silu", f"`mamba_hidden_act`={self.mamba_hidden_act!r}; Mamba-2 uses 'silu'.")
        blocks = set(self.layers_block_type) | (set(self.mtp_layers_block_type) if self.num_nextn_predict_layers else set())
        if "moe" in blocks:
            need(self.n_routed_experts > 0, f"`n_routed_experts`={self.n_routed_experts} must be > 0 for 'E' layers.")
            need(
                0 < self.num_experts_per_tok <= self.n_routed_experts,
                f"`num_experts_per_tok`={self.num_experts_per_tok} must be between 1 and `n_routed_experts`="
                f"{self.n_routed_experts}; lower top-k or add experts.",
            )
            need(
                self.n_routed_experts % self.n_group == 0,
                f"`n_group`={self.n_group} does not divide `n_routed_experts`={self.n_routed_experts}; "
                "pick a group count that divides the expert count.",
            )
            need(
                1 <= self.topk_group <= self.n_group,
                f"`topk_group`={self.topk_group} must be between 1 and `n_group`={self.n_group}.",
            )
            per_group = self.n_routed_experts // self.n_group
            need(
                self.n_group == 1 or self.num_experts_per_tok <= self.topk_group * per_group,
                f"`num_experts_per_tok`={self.num_experts_per_tok} exceeds the {self.topk_group * per_group} experts "
                "reachable in `topk_group` groups; raise `topk_group` or lower top-k.",
            )
            need(
                self.n_group == 1 or per_group >= 2,
                f"`n_group`={self.n_group} leaves fewer than 2 experts per group; group scores use the top-2.",
            )
            need(
                self.moe_router_score_function in ROUTER_SCORE_FUNCTIONS,
                f"`moe_router_score_function`={self.moe_router_score_function!r}; use one of {ROUTER_SCORE_FUNCTIONS}.",
            )
            need(self.moe_latent_size is None or self.moe_latent_size > 0,
                 f"`moe_latent_size`={self.moe_latent_size} must be a positive integer or null.")
        need(self.num_nextn_predict_layers in (0, 1),
             f"`num_nextn_predict_layers`={self.num_nextn_predict_layers}; Nemotron 3 uses 0 (no MTP) or 1 "
             "(one MTP block applied recursively).")
        need(self.mtp_num_depths >= 1, f"`mtp_num_depths`={self.mtp_num_depths} must be >= 1.")
        need(self.use_rope is False or (0 < self.partial_rotary_factor <= 1 and self.rope_theta > 0),
             f"`partial_rotary_factor`={self.partial_rotary_factor} / `rope_theta`={self.rope_theta} invalid for RoPE.")
        need(math.isfinite(self.routed_scaling_factor), "`routed_scaling_factor` must be finite.")
        need(isinstance(self.attention_qk_norm, bool),
             f"`attention_qk_norm`={self.attention_qk_norm!r} must be true or false.")
        scaling = self.rope_scaling_params
        if scaling is not None:
            need(self.use_rope is True,
                 f"`rope_scaling_params`={scaling!r} is set but `use_rope` is false, so it would do nothing; set "
                 "`use_rope=True` or drop `rope_scaling_params`.")
            kind = scaling["rope_type"]
            need(scaling["factor"] > 0, f"`rope_scaling_params['factor']`={scaling['factor']} must be > 0.")
            if kind == "dynamic":
                need(scaling["factor"] >= 1, f"`rope_scaling_params['factor']`={scaling['factor']} must be >= 1 "
                     "for 'dynamic' RoPE.")
                need(int(self.head_dim * self.partial_rotary_factor) > 2,
                     "'dynamic' RoPE needs more than 2 rotary channels (`head_dim` * `partial_rotary_factor`).")
            if kind == "llama3":
                low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
                need(0 < low < high, f"`rope_scaling_params` low_freq_factor={low} / high_freq_factor={high}: need "
                     "0 < low_freq_factor < high_freq_factor (Llama 3.1 uses 1 and 4).")
                need(scaling["original_max_position_embeddings"] > 0,
                     "`rope_scaling_params['original_max_position_embeddings']` must be a positive integer.")

    # ------------------------------------------------------------------ official on-disk form
    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reader; an official ``model_type: nemotron_h`` is this class's own format, so it is read
        without the "model of type ... to instantiate a model of type ..." warning."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == cls.checkpoint_model_type:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def to_json_file(self, json_file_path, use_diff: bool = True) -> None:
        """Write the official ``nemotron_h`` config.json (every key, as vLLM and NVIDIA's tools read it)."""
        import json

        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(json.dumps(self.to_official_dict(), indent=2, sort_keys=True) + "\n")

    def to_official_dict(self) -> dict[str, Any]:
        """The config as the official ``nemotron_h`` config.json that vLLM and NVIDIA's tools read."""
        d = self.to_dict()
        d.pop("layers_block_type", None)
        d.pop("mtp_layers_block_type", None)
        d["model_type"] = "nemotron_h"
        if self.architectures:  # set by save_pretrained; a bare config round-trips without it
            d["architectures"] = [a.replace("Nemotron3", "NemotronH") for a in self.architectures]
        d["hybrid_override_pattern"] = self.hybrid_override_pattern
        d["num_hidden_layers"] = self.num_hidden_layers
        if self.num_nextn_predict_layers:
            d["mtp_hybrid_override_pattern"] = self.mtp_hybrid_override_pattern
        d["time_step_limit"] = list(self.time_step_limit)
        d["norm_eps"] = self.layer_norm_epsilon
        for key in ("_attn_implementation_internal", "_experts_implementation_internal", "layer_types",
                    "mtp_layer_types"):
            d.pop(key, None)
        return d


__all__ = ["Nemotron3Config", "parse_block_types"]
