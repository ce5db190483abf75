"""Hybrid cache of Nemotron 3: a transformers `Cache` with one layer object per block.

- Mamba (`M`) layers: `MambaLayer`, a transformers ``LinearAttentionLayer`` whose conv state
  ``conv_states[0]`` is ``[b, conv_dim, k]`` (the last k inputs of the depthwise convolution) and whose
  recurrent state ``recurrent_states[0]`` is the fp32 SSM state ``[b, heads, head_dim, state]``.
- Attention (`*`) layers: `AttentionLayer`, a transformers ``DynamicLayer`` whose key/value buffers are
  preallocated and grow geometrically, so a decode step writes one column instead of concatenating the
  whole history (``keys`` / ``values`` are views of the filled part, as ``DynamicLayer`` code expects).
- MoE and MLP layers: transformers' ``DummyLayer`` (no state).

Because it is a transformers `Cache`, everything ``generate`` does with caches works: beam reordering,
``crop`` after assisted decoding or prompt lookup (the Mamba layers record the state after every token while
``activate_past_recording`` is on and roll back to it), batch expansion. The model also runs with a plain
``DynamicCache(config=model.config)`` (built from ``config.layer_types``); this class is the default because of
its preallocated keys/values and the states the CPU decode kernels read in place.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, DynamicLayer, LinearAttentionLayer


class MambaLayer(LinearAttentionLayer):
    """Conv window and SSM state of one Mamba-2 layer, allocated when the cache is built.

    While recording (``activate_past_recording``), ``history`` holds the (conv, ssm) states after each token of
    the decode steps since recording began, and ``crop(-n)`` returns to the state ``n`` tokens back.
    """

    is_croppable = True

    def __init__(self, batch_size: int, conv_dim: int, conv_kernel: int, ssm_shape: tuple[int, int, int],
                 dtype: torch.dtype, ssm_dtype: torch.dtype, device) -> None:
        super().__init__(number_of_states=1)
        self.conv_states[0] = torch.zeros(batch_size, conv_dim, conv_kernel, dtype=dtype, device=device)
        self.recurrent_states[0] = torch.zeros(batch_size, *ssm_shape, dtype=ssm_dtype, device=device)
        self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True
        self.conv_kernel_size[0] = conv_kernel
        self.dtype, self.device = dtype, torch.device(device)
        self.batch_size = batch_size
        self.seen = 0  # tokens this layer has processed
        self.history: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._base: tuple[torch.Tensor, torch.Tensor, int] | None = None  # state where recording began

    @classmethod
    def for_config(cls, config, batch_size: int, dtype: torch.dtype, device) -> MambaLayer:
        """The zero state of one Mamba-2 layer of ``config`` (SSM state in ``config.mamba_ssm_cache_dtype``)."""
        return cls(batch_size, config.mamba_conv_dim, config.conv_kernel,
                   (config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size), dtype,
                   getattr(torch, config.mamba_ssm_cache_dtype), device)

    # --- the names the mixer and the CPU kernels use
    @property
    def conv(self) -> torch.Tensor:
        return self.conv_states[0]

    @conv.setter
    def conv(self, value: torch.Tensor) -> None:
        self.conv_states[0] = value

    @property
    def ssm(self) -> torch.Tensor:
        return self.recurrent_states[0]

    @ssm.setter
    def ssm(self, value: torch.Tensor) -> None:
        self.recurrent_states[0] = value

    @property
    def has_previous(self) -> bool:
        return bool(self.has_previous_state[0])

    @has_previous.setter
    def has_previous(self, value: bool) -> None:
        self.has_previous_state[0] = bool(value)

    # --- transformers' layer API
    def lazy_initialization(self, *args, **kwargs) -> None:  # allocated in __init__
        return None

    def get_seq_length(self) -> int:
        return self.seen

    def increase_count(self, state_idx: int = 0) -> None:
        self.seen += 1

    def reset(self) -> None:
        self.conv.zero_()
        self.ssm.zero_()
        self.has_previous = False
        self.seen = 0
        self.stop_recording()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.conv = self.conv.index_select(0, beam_idx.to(self.conv.device))
        self.ssm = self.ssm.index_select(0, beam_idx.to(self.ssm.device))
        self.batch_size = self.conv.shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.conv = self.conv.repeat_interleave(repeats, 0)
        self.ssm = self.ssm.repeat_interleave(repeats, 0)
        self.batch_size = self.conv.shape[0]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.conv, self.ssm = self.conv[indices], self.ssm[indices]
        self.batch_size = self.conv.shape[0]

    @property
    def is_compileable(self) -> bool:  # recording appends Python lists
        return False

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        """Keep the state after every following token until `crop` / `stop_recording` (speculative decoding)."""
        self.record_past = True
        self.recurrent_states_to_keep = recurrent_states_to_keep or 0  # 0: unknown (transformers 5.24 gives none)
        self.history = []
        self._base = (self.conv.clone(), self.ssm.clone(), self.seen)

    def stop_recording(self) -> None:
        self.record_past = False
        self.history = None
        self._base = None

    def record(self) -> None:
        """Called by the mixer after each recorded token."""
        self.history.append((self.conv.clone(), self.ssm.clone()))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (a negative count, as transformers calls it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove.")
        remove = -tokens_to_remove
        if remove:
            if self.history is None or remove > len(self.history):
                raise ValueError(
                    f"Cannot roll a Mamba layer back by {remove} tokens: only {len(self.history or [])} were recorded. "
                    "Call `cache.activate_past_recording()` before the tokens you may want to undo."
                )
            keep = len(self.history) - remove
            conv, ssm = self.history[keep - 1] if keep else self._base[:2]
            self.conv.copy_(conv)
            self.ssm.copy_(ssm)
            self.seen -= remove
        if self.history is not None:  # recording goes on from the current state
            self.history = []
            self._base = (self.conv.clone(), self.ssm.clone(), self.seen)

    def keep_first(self, count: int) -> None:
        """Stop recording, keeping the state after the first ``count`` tokens recorded."""
        if self.history is not None and len(self.history) > count:
            self.crop(count - len(self.history))
        self.stop_recording()


class AttentionLayer(DynamicLayer):
    """Keys/values ``[b, kv_heads, capacity, head_dim]`` preallocated; ``keys`` / ``values`` are the filled part.

    Assigning ``keys`` / ``values`` (as ``DynamicLayer``'s crop, reorder and batch methods do) replaces the buffer
    with the assigned tensor; the next `update` grows it again.
    """

    def __init__(self) -> None:
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.length = 0
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.key_buffer is None else self.key_buffer[:, :, : self.length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self.key_buffer = value
        self.length = 0 if value is None or value.dim() < 3 else value.shape[2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.value_buffer is None else self.value_buffer[:, :, : self.length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self.value_buffer = value

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def reserve(self, need: int, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        """Room for ``need`` tokens (buffers shaped like ``k`` / ``v`` or the current ones), growing geometrically
        and keeping what is filled."""
        if self.key_buffer is not None and need <= self.key_buffer.shape[2]:
            return
        k = k if k is not None else self.key_buffer
        v = v if v is not None else self.value_buffer
        cap = max(need, 2 * (self.key_buffer.shape[2] if self.key_buffer is not None else 0), 64)
        keys = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
        values = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        length = self.length
        if self.key_buffer is not None and length:
            keys[:, :, :length] = self.key_buffer[:, :, :length]
            values[:, :, :length] = self.value_buffer[:, :, :length]
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.length
        need = start + key_states.shape[2]
        self.reserve(need, key_states, value_states)
        self.key_buffer[:, :, start:need] = key_states
        self.value_buffer[:, :, start:need] = value_states
        self.length = need
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove.")
        self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        self.length = 0
        self.is_initialized = False


class Nemotron3HybridCache(Cache):
    """Per-layer decoding state of a Nemotron 3 model (also of its MTP head, with ``block_types`` extended).

    Args:
        config: the model's `Nemotron3Config`.
        batch_size, dtype, device: of the Mamba states (allocated here; attention buffers follow their inputs).
        block_types: block kinds per layer index (default: the main model's ``config.layers_block_type``).
    """

    def __init__(self, config, batch_size: int, dtype: torch.dtype = torch.float32, device="cpu",
                 block_types: list[str] | None = None) -> None:
        self.config = config
        self.block_types = list(block_types if block_types is not None else config.layers_block_type)
        from .blocks import MIXER_TYPES  # the block table: each kind's mixer class says what state it keeps

        layers = []
        for kind in self.block_types:
            make = getattr(MIXER_TYPES[kind], "cache_layer", None)
            layer = make(config, batch_size, dtype, device) if make is not None else None
            layers.append(layer if layer is not None else DummyLayer())
        super().__init__(layers=layers)
        # per model: whatever a decode backend keeps for this cache (the CPU kernels: their decode plan); bound to
        # this cache's states, so copies and pickles of the cache start without them
        self.decode_plans: dict = {}
        self._record_start: int | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["decode_plans"] = {}
        return state

    def __deepcopy__(self, memo):
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, {} if key == "decode_plans" else copy.deepcopy(value, memo))
        return new

    def get(self, layer_idx: int):
        """The state of one layer (None for stateless MoE/MLP layers)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return None if layer is None or isinstance(layer, DummyLayer) else layer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already processed (read from the first layer that holds state)."""
        return seq_length(self)

    @property
    def seen_tokens(self) -> int:
        return seq_length(self)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return seq_length(self) + query_length, 0

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if isinstance(layer, MambaLayer):
                return layer.batch_size
            if isinstance(layer, AttentionLayer) and layer.key_buffer is not None:
                return layer.key_buffer.shape[0]
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        """Make the Mamba layers keep the state after each following token, so `crop(-n)` can roll back."""
        for layer in self.layers:
            if isinstance(layer, MambaLayer):
                layer.activate_past_recording(recurrent_states_to_keep)

    # ------------------------------------------------------------------ speculative decoding with MTP
    def start_recording(self) -> None:
        """Keep the Mamba state after every token of the next forward (for `keep_first`)."""
        self._record_start = self.seen_tokens
        for layer in self.layers:
            if isinstance(layer, MambaLayer):
                layer.activate_past_recording()

    def keep_first(self, count: int | None) -> None:
        """Stop recording; with ``count``, keep only the first ``count`` tokens seen since `start_recording`.

        Mamba layers take their recorded state after that token; attention layers of the main model forget later
        keys (the KV of an MTP head, indices past the main layers, is its caller's business).
        """
        n_main = len(self.config.layers_block_type)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MambaLayer):
                if count is None:
                    layer.stop_recording()
                else:
                    layer.keep_first(count)
            elif isinstance(layer, AttentionLayer) and count is not None and i < n_main:
                layer.length = min(layer.length, self._record_start + count)
        self._record_start = None


def seq_length(cache) -> int:
    """Tokens a transformers `Cache` has processed: the first attention layer's length, else the first Mamba layer's
    count, else 0 (works for this package's cache and for transformers' ``DynamicCache`` / ``StaticCache``)."""
    if cache is None:
        return 0
    fallback = None
    for layer in cache.layers:
        if isinstance(layer, DummyLayer):
            continue
        if isinstance(layer, CacheLayerMixin):  # attention-like
            return int(layer.get_seq_length())
        if fallback is None:
            fallback = layer
    return int(fallback.get_seq_length()) if fallback is not None else 0


def mamba_layer(cache, layer_idx: int, config, batch_size: int, dtype: torch.dtype, device) -> MambaLayer | None:
    """The `MambaLayer` of ``layer_idx`` in any transformers `Cache`: a transformers linear-attention layer that has
    not run yet (a ``DynamicCache(config=...)`` the caller built) is replaced by one, in place."""
    if cache is None:
        return None
    if layer_idx >= len(cache.layers) and getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(cache.layers) <= layer_idx:  # a `DynamicCache()` without config grows its layers on demand
            cache.layers.append(cache.layer_class_to_replicate())
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if isinstance(layer, MambaLayer):
        return layer
    fresh = ((isinstance(layer, LinearAttentionLayer) and not any(layer.is_conv_states_initialized.values()))
             or (type(layer) is DynamicLayer and not layer.is_initialized))
    if fresh:
        layer = MambaLayer.for_config(config, batch_size, dtype, device)
        cache.layers[layer_idx] = layer
        return layer
    raise ValueError(
        f"Layer {layer_idx} of the cache passed in is a {type(layer).__name__}, which cannot hold a Mamba-2 state; "
        "pass `Nemotron3HybridCache(model.config, batch_size)`, `DynamicCache(config=model.config)` or no cache."
    )


__all__ = ["Nemotron3HybridCache", "MambaLayer", "AttentionLayer", "seq_length", "mamba_layer"]
