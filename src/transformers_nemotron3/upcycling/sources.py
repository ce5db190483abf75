"""Dense sources: a model object or a directory of safetensors, read one tensor at a time.

Two families are understood:

- ``"llama"``: LlamaForCausalLM and the architectures that share its layout and math (Mistral without
  sliding window, Qwen2 with its q/k/v biases, Qwen3 with its per-head q/k RMSNorm; RoPE plain or scaled
  with ``linear``, ``dynamic`` or ``llama3``). A decoder layer maps to two Nemotron 3 blocks,
  ``*`` (attention with RoPE) then ``E`` (gated experts).
- ``"nemotron_h"``: dense Nemotron-H (transformers' NemotronHForCausalLM, a Nemotron3ForCausalLM, or
  their checkpoints); ``-`` layers become ``E`` with relu² experts, ``M`` and ``*`` are copied.

Reading a directory uses the safetensors header and plain file reads (no mmap), so streaming
conversion holds only the tensors of the layer being converted.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

import torch

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
NEMOTRON_H_FAMILY = ("nemotron_h", "nemotron3")
SUPPORTED = LLAMA_FAMILY + NEMOTRON_H_FAMILY
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsDir:
    """Lazy reader of every ``*.safetensors`` in a folder: ``keys()`` and ``get(key)`` (a fresh tensor)."""

    def __init__(self, folder: Path) -> None:
        self.entries: dict[str, tuple[Path, int, str, list[int], int, int]] = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"No *.safetensors weights in {folder}; save the dense model with safetensors.")
        for file in files:
            with open(file, "rb") as fh:
                raw = fh.read(8)
                if len(raw) != 8:
                    raise ValueError(f"{file} is not a safetensors file (truncated header).")
                (n,) = struct.unpack("<Q", raw)
                try:
                    header = json.loads(fh.read(n))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{file} has a corrupt safetensors header ({exc}).") from exc
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                start, end = meta["data_offsets"]
                self.entries[key] = (file, 8 + n, meta["dtype"], meta["shape"], start, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype (reads nothing)."""
        _, _, dtype, shape, _, _ = self.entries[key]
        return torch.empty(shape, dtype=_DTYPES[dtype], device="meta")

    def get(self, key: str) -> torch.Tensor:
        file, base, dtype, shape, start, end = self.entries[key]
        if dtype not in _DTYPES:
            raise ValueError(f"Tensor {key!r} in {file} has unsupported dtype {dtype}.")
        with open(file, "rb") as fh:
            fh.seek(base + start)
            data = bytearray(fh.read(end - start))
        if len(data) != end - start:
            raise ValueError(f"{file} is truncated: tensor {key!r} is incomplete; save the dense model again.")
        if not data:
            return torch.empty(shape, dtype=_DTYPES[dtype])
        return torch.frombuffer(data, dtype=_DTYPES[dtype]).reshape(shape)


class DenseSource:
    """A dense model to upcycle: its ``family``, source ``config`` (a dict) and tensors by source key.

    Build it with `DenseSource.open(model_or_path)`. ``get`` returns the stored tensor (for a model
    object the live parameter, detached); callers copy what they keep.
    """

    def __init__(self, family: str, config: dict[str, Any], keys: list[str], getter: Callable[[str], torch.Tensor],
                 origin: str) -> None:
        self.family = family
        self.config = config
        self._keys = set(keys)
        self._get = getter
        self.origin = origin
        self._meta: Callable[[str], torch.Tensor] = lambda k: getter(k).to("meta")

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, model_or_path: Any) -> "DenseSource":
        """Wrap a transformers/Nemotron3 model object or a directory with config.json + safetensors."""
        if isinstance(model_or_path, (str, Path)):
            folder = Path(model_or_path)
            if not folder.is_dir() or not (folder / "config.json").exists():
                raise ValueError(f"Dense source {str(folder)!r} is not a directory with config.json and *.safetensors.")
            config = json.loads((folder / "config.json").read_text())
            family = detect_family(config, str(folder))
            reader = SafetensorsDir(folder)
            source = cls(family, config, reader.keys(), reader.get, str(folder))
            source._meta = reader.meta
            return source
        if isinstance(model_or_path, torch.nn.Module) and hasattr(model_or_path, "config"):
            config = model_or_path.config.to_dict()
            family = detect_family(config, type(model_or_path).__name__)
            state = model_or_path.state_dict()
            source = cls(family, config, list(state), lambda k: state[k].detach().clone(), type(model_or_path).__name__)
            source._meta = lambda k: state[k].detach().to("meta")
            return source
        raise ValueError(
            f"Cannot upcycle {type(model_or_path).__name__}: pass a transformers model object or the path of a "
            "directory holding config.json and *.safetensors."
        )

    def meta_view(self) -> "DenseSource":
        """The same source with shape/dtype-only (meta) tensors: plans the output without reading weights."""
        view = DenseSource(self.family, self.config, list(self._keys), self._meta, self.origin)
        view._meta = self._meta
        return view

    # ------------------------------------------------------------------ access
    def has(self, key: str) -> bool:
        return key in self._keys

    def keys(self) -> list[str]:
        return sorted(self._keys)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise ValueError(f"The dense source {self.origin} has no tensor {key!r}; is it a complete checkpoint?")
        return self._get(key)

    def first(self, *keys: str) -> torch.Tensor:
        """The first of ``keys`` that exists (checkpoints spell some names in two ways)."""
        for key in keys:
            if key in self._keys:
                return self._get(key)
        raise ValueError(f"The dense source {self.origin} has none of {list(keys)}; is it a complete checkpoint?")


def detect_family(config: dict[str, Any], where: str) -> str:
    """``"llama"`` or ``"nemotron_h"`` from a config dict; ValueError for anything else."""
    model_type = config.get("model_type")
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type in NEMOTRON_H_FAMILY:
        return "nemotron_h"
    raise ValueError(
        f"{where}: cannot upcycle model_type={model_type!r} (architectures={config.get('architectures')}). "
        f"Supported dense sources: {', '.join(SUPPORTED)} (Llama-style decoders and dense Nemotron-H)."
    )


__all__ = ["DenseSource", "SafetensorsDir", "detect_family", "SUPPORTED"]
