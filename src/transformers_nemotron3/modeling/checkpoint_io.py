"""Reading and writing Nemotron 3 checkpoints.

Reads the official layout (``backbone.*``, one tensor per expert, ``mtp.*``, sharded safetensors with
an index), the layout transformers' native NemotronH saves (``model.*``, fused 3-D experts), and
older Nemotron-H files (``backbone.embedding.weight``). Writes the official layout by default, so
vLLM and NVIDIA's tools read what we write, plus ``auto_map`` and these modeling files for
``trust_remote_code``. Both directions are lossless. Every problem (missing or unexpected tensors,
wrong shapes, truncated files) raises an error that names the key or file; nothing loads partially.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

SAFE_INDEX = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj|gate_proj)\.weight$")
_FUSED_KEY = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj|gate_proj)$")
_LOADER_KWARGS = {  # accepted from transformers' Auto classes / Trainer and deliberately unused here
    "trust_remote_code", "_from_auto", "_from_pipeline", "code_revision", "adapter_kwargs", "use_safetensors",
    "low_cpu_mem_usage", "_commit_hash", "output_loading_info", "use_kernels", "key_mapping", "offload_folder",
    "offload_state_dict", "weights_only", "variant", "subfolder", "tp_plan", "distributed_config", "quantization_config",
}


def modeling_dir() -> Path:
    """Folder of the exportable modeling files (this file's folder)."""
    return Path(__file__).resolve().parent


def to_internal_key(key: str) -> str:
    """Map a checkpoint key (official, native transformers or old Nemotron-H) to our parameter name."""
    if key.startswith("model."):
        key = "backbone." + key[len("model."):]
    if key == "backbone.embedding.weight":
        key = "backbone.embeddings.weight"
    return key


def _resolve_dir(path: str | os.PathLike, **hub_kwargs) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir", "local_files_only")}
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.py", "*.jinja",
                                                                  "tokenizer*"], **allowed))
    except Exception as exc:  # noqa: BLE001 - surface one clear error
        raise ValueError(
            f"Cannot find checkpoint {str(path)!r}: not a local directory and not downloadable ({exc}). "
            "Pass a directory containing config.json and *.safetensors, or a Hub repo id."
        ) from exc


def _weight_files(folder: Path) -> list[Path]:
    index = folder / SAFE_INDEX
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index ({exc}); re-save the checkpoint.") from exc
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ValueError(f"The index {index} names shard(s) that are not there: {missing}; download them again.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"No *.safetensors weights in {folder}; only safetensors checkpoints are supported.")
    return files


def read_checkpoint(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, keys mapped to our names, per-expert tensors stacked into 3-D tensors."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for file in _weight_files(folder):
        try:
            handle = safe_open(str(file), framework="pt", device=str(device))
            keys = list(handle.keys())
        except Exception as exc:  # noqa: BLE001
            raise ValueError(
                f"{file} is not a readable safetensors file ({exc}); it is probably truncated or corrupt - "
                "download or save it again."
            ) from exc
        for key in keys:
            try:
                value = handle.get_tensor(key)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"Tensor {key!r} in {file} cannot be read ({exc}); the file is damaged.") from exc
            key = to_internal_key(key)
            match = _EXPERT_KEY.match(key)
            if match:
                experts.setdefault((match.group(1), match.group(3)), {})[int(match.group(2))] = value
            else:
                tensors[key] = value
    for (prefix, proj), per_expert in experts.items():
        count = max(per_expert) + 1
        gaps = sorted(set(range(count)) - set(per_expert))
        if gaps:
            raise ValueError(f"Checkpoint is missing experts {gaps[:10]} of {prefix}.*.{proj}.weight.")
        tensors[f"{prefix}.{proj}"] = torch.stack([per_expert[i] for i in range(count)])
    return tensors


def to_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> official keys: fused experts split into one tensor per expert."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _FUSED_KEY.match(key)
        if match:
            for i in range(value.shape[0]):
                out[f"{match.group(1)}.{i}.{match.group(2)}.weight"] = value[i]
        else:
            out[key] = value
    return out


def to_native_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the layout transformers' NemotronHForCausalLM saves with save_original_format=False."""
    return {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in state.items()
            if not k.startswith("mtp.")}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; use an int of bytes or a string like '5GB'.")
    unit = match.group(2).upper()
    scale = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def write_safetensors(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    """Write ``state`` as one file or as shards with an index (shards named like transformers does)."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        tensor = state[key].detach().contiguous()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    (folder / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True))


def publish_dir(tmp: Path, target: Path) -> None:
    """Move the finished files of ``tmp`` into ``target`` (each rename atomic), dropping stale weight shards."""
    target.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in tmp.iterdir()}
    for old in list(target.glob("model*.safetensors")) + [target / SAFE_INDEX]:
        if old.exists() and old.name not in new:
            old.unlink()
    for item in tmp.iterdir():
        dest = target / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    shutil.rmtree(tmp, ignore_errors=True)


class CheckpointMixin:
    """`from_pretrained` / `save_pretrained` for the official Nemotron 3 on-disk layout."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, dtype="auto",
                        torch_dtype=None, device_map=None, attn_implementation: str | None = None, **kwargs):
        """Load a checkpoint in the official, native-transformers or old Nemotron-H layout.

        Args:
            pretrained_model_name_or_path: local directory or Hub repo id.
            config: a ready `Nemotron3Config` (else read from ``config.json``).
            dtype: ``"auto"`` (the checkpoint's dtype), a torch dtype, or its name.
            device_map: ``None``/``"cpu"``, ``"cuda"``, ``"auto"`` or a device: where to load the weights.
            attn_implementation: ``"sdpa"`` (default), ``"eager"`` or a transformers attention kernel name.
            kwargs: config overrides (e.g. ``use_cache=False``) and Hub options (revision, token, cache_dir).
        """
        from .configuration_nemotron3 import Nemotron3Config

        if model_args:
            raise ValueError(f"Unexpected positional arguments {model_args!r}; pass options as keywords.")
        dtype = torch_dtype if torch_dtype is not None else dtype
        hub = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only", "force_download")
               if k in kwargs}
        for key in _LOADER_KWARGS:
            kwargs.pop(key, None)
        folder = _resolve_dir(pretrained_model_name_or_path, **hub)
        known = set(inspect.signature(Nemotron3Config.__init__).parameters) | set(vars(Nemotron3Config()))
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            raise ValueError(f"Unknown from_pretrained option(s) {unknown}: not config keys or loader options.")
        if config is None:
            config_file = folder / "config.json"
            if not config_file.exists():
                raise ValueError(f"{folder} has no config.json; it is not a model checkpoint.")
            raw = json.loads(config_file.read_text())
        else:
            raw = config.to_dict() if not isinstance(config, Nemotron3Config) else None
        if raw is not None:
            for key in ("model_type", "architectures", "auto_map", "transformers_version"):
                raw.pop(key, None)
            if "hybrid_override_pattern" in kwargs or "layers_block_type" in kwargs:
                raw.pop("hybrid_override_pattern", None)
                raw.pop("layers_block_type", None)
                raw.pop("num_hidden_layers", None)
            config = Nemotron3Config(**{**raw, **kwargs})
        else:
            config = Nemotron3Config(**{**config.to_dict(), **kwargs}) if kwargs else config
        config._attn_implementation = attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"

        device = _device_from_map(device_map)
        state = read_checkpoint(folder, device="cpu" if device.type == "meta" else device)
        target_dtype = _resolve_dtype(dtype, config, state)
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        _check_keys(expected, state, folder)
        fp32 = ("gate.weight", "e_score_correction_bias")
        for key, value in state.items():
            want = torch.float32 if key.endswith(fp32) else target_dtype
            if value.is_floating_point() and value.dtype != want:
                state[key] = value.to(want)
        model.load_state_dict(state, strict=True, assign=True)
        model.config.dtype = target_dtype
        model.to(device)
        model.eval()
        gen_file = folder / "generation_config.json"
        if gen_file.exists() and getattr(model, "generation_config", None) is not None:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        return model

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None,
                        max_shard_size: int | str = "5GB", safe_serialization: bool = True,
                        save_original_format: bool = True, **kwargs) -> None:
        """Save weights (official layout by default), ``config.json`` with ``auto_map``, and the modeling code.

        Files are written to a temporary folder beside ``save_directory`` and moved in at the end, so an
        interrupted save leaves any earlier checkpoint intact. ``save_original_format=False`` writes the
        layout of transformers' native NemotronH (``model.*``, fused experts; MTP dropped).
        """
        if not safe_serialization:
            raise ValueError("Only safetensors is supported; call save_pretrained with safe_serialization=True.")
        if not is_main_process:
            return
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise ValueError(f"{target} exists and is not a directory; choose another save_directory.")
        target.parent.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        state = to_official_state_dict(state) if save_original_format else to_native_state_dict(state)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=str(target.parent)))
        try:
            write_safetensors(state, tmp, max_shard_size)
            cfg = self.config.to_official_dict()
            cfg["auto_map"] = {
                "AutoConfig": "configuration_nemotron3.Nemotron3Config",
                "AutoModel": "modeling_nemotron3.Nemotron3Model",
                "AutoModelForCausalLM": "modeling_nemotron3.Nemotron3ForCausalLM",
            }
            dtype = getattr(self, "dtype", torch.float32)
            cfg["dtype"] = str(dtype).replace("torch.", "")
            cfg.pop("_attn_implementation_internal", None)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            gen = getattr(self, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(str(tmp))
            for source in modeling_dir().glob("*.py"):
                if source.name != "__init__.py":
                    shutil.copy2(source, tmp / source.name)
            publish_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _device_from_map(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, (str, torch.device, int)):
        return torch.device(device_map)
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return torch.device(device_map[""])
    raise ValueError(
        f"device_map={device_map!r} is not supported: Nemotron 3 loads onto one device "
        "('cpu', 'cuda', 'cuda:1', 'auto'); shard large models with the package's parallel plugins instead."
    )


def _resolve_dtype(dtype, config, state) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(name, torch.dtype):
            return name
        if isinstance(name, str) and hasattr(torch, name):
            return getattr(torch, name)
        for key, value in state.items():
            if value.is_floating_point() and not key.endswith(("gate.weight", "e_score_correction_bias")):
                return value.dtype
        return torch.float32
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype={dtype!r} is not a torch dtype; use 'auto', 'bfloat16', 'float32' or torch.bfloat16.")


def _check_keys(expected: dict, state: dict, folder: Path) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
        raise ValueError(
            f"Checkpoint {folder} does not match the config: " + "; ".join(parts)
            + ". Check that config.json belongs to these weights (layer pattern, MTP layers, LatentMoE)."
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"Tensor {key!r} has shape {tuple(value.shape)} in {folder}, but the config expects "
                f"{tuple(expected[key].shape)}; config.json and the weights disagree."
            )


__all__ = ["CheckpointMixin", "read_checkpoint", "to_official_state_dict", "to_native_state_dict", "to_internal_key"]
