"""Hybrid cache: conv + fp32 SSM state for Mamba (`M`) layers, key/value tensors for attention (`*`) layers.

MoE and MLP layers hold no state. Key/value buffers are preallocated and grow geometrically, so a
decode step writes one column instead of concatenating the whole history. `snapshot` / `restore`
and `crop` let speculative decoding roll the cache back after a rejected draft.
"""

from __future__ import annotations

import torch


class MambaState:
    """Conv window ``[b, conv_dim, k]`` (last k inputs) and SSM state ``[b, heads, head_dim, state]``."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.conv = conv
        self.ssm = ssm
        self.has_previous = False
        self.history: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per-token states while recording


class KVState:
    """Preallocated keys/values ``[b, kv_heads, capacity, head_dim]`` with a fill length."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def reserve(self, need: int, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        """Room for ``need`` tokens (buffers shaped like ``k`` / ``v``, or like the current ones), growing
        geometrically and keeping what is filled."""
        if self.keys is not None and need <= self.keys.shape[2]:
            return
        k = k if k is not None else self.keys
        v = v if v is not None else self.values
        cap = max(need, 2 * (self.keys.shape[2] if self.keys is not None else 0), 64)
        keys = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
        values = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        if self.keys is not None and self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.length + k.shape[2]
        self.reserve(need, k, v)
        self.keys[:, :, self.length : need] = k
        self.values[:, :, self.length : need] = v
        self.length = need
        return self.keys[:, :, :need], self.values[:, :, :need]


class Nemotron3HybridCache:
    """Per-layer decoding state of a Nemotron 3 model; created by the model on first use."""

    is_compileable = False

    def __init__(self, config, batch_size: int, dtype: torch.dtype, device: torch.device | str,
                 block_types: list[str] | None = None) -> None:
        self.config = config
        self.batch_size = batch_size
        self.block_types = list(block_types if block_types is not None else config.layers_block_type)
        ssm_dtype = getattr(torch, config.mamba_ssm_cache_dtype)
        self.layers: dict[int, MambaState | KVState] = {}
        for i, kind in enumerate(self.block_types):
            if kind == "mamba":
                conv = torch.zeros(batch_size, config.mamba_conv_dim, config.conv_kernel, dtype=dtype, device=device)
                ssm = torch.zeros(batch_size, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size,
                                  dtype=ssm_dtype, device=device)
                self.layers[i] = MambaState(conv, ssm)
            elif kind == "attention":
                self.layers[i] = KVState()
        self.seen_tokens = 0
        # per model: (kernels, dtype, fused decode plan or None), see Nemotron3Model.fused_decode; bound to
        # this cache's states, so copies and pickles of the cache start without them
        self.decode_plans: dict = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["decode_plans"] = {}
        return state

    def get(self, layer_idx: int) -> MambaState | KVState | None:
        """The state of one layer (None for stateless MoE/MLP layers)."""
        return self.layers.get(layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens already processed."""
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.block_types)

    # ------------------------------------------------------------------ rollback / beams
    def snapshot(self) -> dict:
        """Copy of the Mamba states and the KV lengths, for `restore`."""
        snap = {"seen": self.seen_tokens}
        for i, st in self.layers.items():
            if isinstance(st, MambaState):
                snap[i] = (st.conv.clone(), st.ssm.clone(), st.has_previous)
            else:
                snap[i] = st.length
        return snap

    def restore(self, snap: dict) -> None:
        """Return to a `snapshot` (attention keys past the saved length are simply forgotten)."""
        self.seen_tokens = snap["seen"]
        for i, st in self.layers.items():
            if isinstance(st, MambaState):
                conv, ssm, has_prev = snap[i]
                st.conv.copy_(conv)
                st.ssm.copy_(ssm)
                st.has_previous = has_prev
            else:
                st.length = snap[i]

    def start_recording(self) -> None:
        """Keep the Mamba state after every token of the next forward (for `keep_first`)."""
        self._record_start = self.seen_tokens
        for st in self.layers.values():
            if isinstance(st, MambaState):
                st.history = []

    def keep_first(self, count: int | None) -> None:
        """Stop recording; with ``count``, keep only the first ``count`` tokens seen since `start_recording`.

        Mamba layers take their recorded state after that token, attention layers of the main model
        forget later keys (the KV of an MTP head, indices past the main layers, is its caller's business).
        """
        for st in self.layers.values():
            if isinstance(st, MambaState) and st.history is not None:
                if count is not None and len(st.history) > count:
                    conv, ssm = st.history[count - 1]
                    st.conv.copy_(conv)
                    st.ssm.copy_(ssm)
                st.history = None
        if count is not None:
            length = self._record_start + count
            n_main = len(self.config.layers_block_type)
            for i, st in self.layers.items():
                if isinstance(st, KVState) and i < n_main:
                    st.length = min(st.length, length)
            self.seen_tokens = min(self.seen_tokens, length)

    def crop(self, length: int) -> None:
        """Forget attention keys past ``length`` tokens (Mamba states must be restored separately)."""
        for st in self.layers.values():
            if isinstance(st, KVState):
                st.length = min(st.length, length)
        self.seen_tokens = min(self.seen_tokens, length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for st in self.layers.values():
            if isinstance(st, MambaState):
                st.conv = st.conv.index_select(0, beam_idx.to(st.conv.device))
                st.ssm = st.ssm.index_select(0, beam_idx.to(st.ssm.device))
            elif st.keys is not None:
                st.keys = st.keys.index_select(0, beam_idx.to(st.keys.device))
                st.values = st.values.index_select(0, beam_idx.to(st.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row (used when one prompt is expanded to several samples)."""
        for st in self.layers.values():
            if isinstance(st, MambaState):
                st.conv = st.conv.repeat_interleave(repeats, 0)
                st.ssm = st.ssm.repeat_interleave(repeats, 0)
            elif st.keys is not None:
                st.keys = st.keys.repeat_interleave(repeats, 0)
                st.values = st.values.repeat_interleave(repeats, 0)
        self.batch_size *= repeats


__all__ = ["Nemotron3HybridCache", "MambaState", "KVState"]
