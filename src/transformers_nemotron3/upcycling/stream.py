"""Offline upcycling: stream a dense checkpoint layer by layer into sharded official-layout safetensors.

1. Plan: run the conversion on meta tensors (shapes and dtypes only) to learn every output tensor, assign
   them to shards of at most ``max_shard_size`` bytes and write each shard's safetensors header up front.
2. Fill: convert one dense layer at a time (reading only that layer from the source) and write its bytes
   at their planned offsets; then drop it. Peak memory is about one dense layer plus its MoE layer.
3. Publish: index, config.json (with ``auto_map``) and the modeling files go into a temporary folder next
   to the destination, which is renamed to the destination at the very end; any error removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as SAFE_INDEX

from ..modeling.checkpoint_layout import to_official_state_dict
from .config import UpcyclingConfig
from .convert import build_target_config, iter_upcycled
from .sources import DenseSource

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja", "generation_config.json")


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"`` / ``"500MiB"`` (transformers' convention)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(size)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"max_shard_size={size!r} is not a size; use an int of bytes or a string like '5GB'.") from exc


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plan_shards(parts: list[dict[str, torch.Tensor]], limit: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Group tensors (in production order) into shards of at most ``limit`` bytes (a bigger tensor alone)."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for part in parts:
        for key, t in part.items():
            if shards[-1] and size + _nbytes(t) > limit:
                shards.append([])
                size = 0
            shards[-1].append((key, t))
            size += _nbytes(t)
    return shards


def _write_header(path: Path, entries: list[tuple[str, torch.Tensor]]) -> dict[str, tuple[int, torch.Size, torch.dtype]]:
    """Create ``path`` with its safetensors header and full length; return key -> (file offset, shape, dtype)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in entries:
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(base + offset)
    return {key: (base + header[key]["data_offsets"][0], t.shape, t.dtype) for key, t in entries}


def upcycle_to_disk(
    dense_path_or_model: Any, destination: str | os.PathLike, config: UpcyclingConfig | None = None, *,
    max_shard_size: int | str = "5GB", progress: bool = True,
) -> Path:
    """Write the upcycled model to ``destination`` (must not exist) without building it in memory.

    The result loads with ``Nemotron3ForCausalLM.from_pretrained(destination)`` and equals
    ``upcycle(dense, config)`` bit for bit. Returns the destination path.
    """
    config = config or UpcyclingConfig()
    config.validate()
    dst = Path(destination)
    if dst.exists():
        raise ValueError(f"Destination {dst} already exists; choose a new path or remove it first (nothing was written).")
    limit = _parse_size(max_shard_size)
    source = DenseSource.open(dense_path_or_model)
    target = build_target_config(source, config)  # validates before anything touches the disk
    plan = [to_official_state_dict(part) for part in iter_upcycled(source.meta_view(), config, target)]
    shards = _plan_shards(plan, limit)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=str(dst.parent)))
    try:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        where: dict[str, tuple[str, int, torch.Size, torch.dtype]] = {}
        for name, entries in zip(names, shards):
            for key, (off, shape, dtype) in _write_header(tmp / name, entries).items():
                where[key] = (name, off, shape, dtype)
        handles = {name: open(tmp / name, "r+b") for name in names}
        try:
            parts = iter_upcycled(source, config, target)
            if progress:
                from tqdm.auto import tqdm

                parts = tqdm(parts, total=len(plan), desc="upcycling", unit="layer")
            for part in parts:
                for key, t in to_official_state_dict(part).items():
                    name, off, shape, dtype = where[key]
                    assert t.shape == shape and t.dtype == dtype, (key, t.shape, shape, t.dtype, dtype)
                    fh = handles[name]
                    fh.seek(off)
                    fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del part
        finally:
            for fh in handles.values():
                fh.close()
        if len(names) > 1:
            total = sum(_nbytes(t) for part in plan for t in part.values())
            index = {"metadata": {"total_size": total}, "weight_map": {k: v[0] for k, v in sorted(where.items())}}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        _write_config(tmp, target, plan)
        if isinstance(dense_path_or_model, (str, os.PathLike)):
            for fname in _TOKENIZER_FILES:
                if (Path(dense_path_or_model) / fname).exists():
                    shutil.copy2(Path(dense_path_or_model) / fname, tmp / fname)
        if dst.exists():
            raise ValueError(f"Destination {dst} appeared while converting; the result was not moved there.")
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_config(folder: Path, target, plan: list[dict[str, torch.Tensor]]) -> None:
    """config.json as `save_pretrained` writes it (official keys, auto_map, dtype) plus the modeling files."""
    cfg = target.to_official_dict()
    cfg["auto_map"] = {
        "AutoConfig": "configuration_nemotron3.Nemotron3Config",
        "AutoModel": "modeling_nemotron3.Nemotron3Model",
        "AutoModelForCausalLM": "modeling_nemotron3.Nemotron3ForCausalLM",
    }
    dtype = plan[0]["backbone.embeddings.weight"].dtype
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("_attn_implementation_internal", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for src in Path(__file__).resolve().parents[1].joinpath("modeling").glob("*.py"):
        if src.name != "__init__.py":
            shutil.copy2(src, folder / src.name)


__all__ = ["upcycle_to_disk"]
