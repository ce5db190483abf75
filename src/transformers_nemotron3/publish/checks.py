"""Check that a saved folder is a complete, loadable Nemotron 3 checkpoint before it goes to the Hub.

``check_folder(path)`` reads the folder the way its future users will, without loading any weights:

1. ``config.json`` parses and builds a :class:`Nemotron3Config`;
2. every ``auto_map`` entry names a ``module.Class`` whose ``module.py`` is in the folder and defines the class;
3. every code file those modules import with a single-dot import (``from .moe import ...``), followed
   recursively with transformers' own ``get_relative_imports``, is in the folder (what ``trust_remote_code``
   downloads);
4. the safetensors files open (header and length intact), and when sharded the index names exactly the
   shards present and exactly the tensors each shard holds; the embedding matches ``vocab_size x hidden_size``;
5. ``generation_config.json`` parses (missing: a warning; ``generate`` then falls back to config defaults);
6. the tokenizer loads with ``AutoTokenizer``, has a chat template, and fits ``vocab_size``.

Problems (the folder would not load, or not as a chat model) and warnings are collected, not raised, so one
run names all of them; :meth:`FolderReport.raise_for_problems` turns problems into one ``ValueError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SAFE_INDEX = "model.safetensors.index.json"
SUMMARY_FILE = "training_summary.json"  # written by the quickstart's training run; rendered in the model card
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Files that are never uploaded, with the reason shown by --dry-run.
_PICKLES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


@dataclass
class FolderReport:
    """What :func:`check_folder` found.

    Attributes:
        folder: the checked folder.
        problems: reasons the folder would not load (or not as a chat model); empty when it is ready.
        warnings: things worth knowing that do not stop loading.
        files: ``(name, size in bytes)`` of the files that would be uploaded, sorted by name.
        skipped: ``(name, reason)`` of what is in the folder but would not be uploaded.
        config: the parsed :class:`Nemotron3Config`, or ``None`` when ``config.json`` is broken.
        num_parameters: tensor elements over all shards (from the headers), or ``None``.
        weight_dtypes: safetensors dtypes seen (``"BF16"``, ``"F32"``...), sorted.
        training_summary: the parsed ``training_summary.json``, when the folder has one.
    """

    folder: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    config: object | None = None
    num_parameters: int | None = None
    weight_dtypes: list[str] = field(default_factory=list)
    training_summary: dict | None = None

    @property
    def ok(self) -> bool:
        """True when nothing stops the folder from loading."""
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise one ``ValueError`` listing every problem (no-op when :attr:`ok`)."""
        if self.problems:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            raise ValueError(f"{self.folder} is not ready to publish ({len(self.problems)} problem(s)):\n{lines}")

    def describe(self) -> str:
        """A few human lines: verdict, files to upload with sizes, skipped files, warnings, problems."""
        total = sum(size for _, size in self.files)
        lines = [f"{self.folder}: {'ready' if self.ok else 'NOT ready'}; {len(self.files)} file(s), {_human(total)}"]
        lines += [f"  {name:<44} {_human(size):>10}" for name, size in self.files]
        lines += [f"  skip {name}: {why}" for name, why in self.skipped]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def check_folder(path: str | Path, *, require_tokenizer: bool = True) -> FolderReport:
    """Check a saved checkpoint folder; see the module docstring for the list of checks.

    Args:
        path: folder written by ``save_pretrained`` (and ``tokenizer.save_pretrained``).
        require_tokenizer: a missing tokenizer or chat template is a problem (default) or only a warning
            (``push_to_hub`` of a model alone, whose tokenizer is pushed separately).

    Returns:
        A :class:`FolderReport`; nothing is raised for a broken folder (except a path that is not a folder).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{str(path)!r} is not a folder; pass the directory you gave to save_pretrained.")
    report = FolderReport(folder=folder.resolve())
    _list_files(folder, report)
    _check_config(folder, report)
    _check_code(folder, report)
    _check_weights(folder, report)
    _check_generation_config(folder, report)
    _check_tokenizer(folder, report, require_tokenizer)
    _read_training_summary(folder, report)
    return report


def _list_files(folder: Path, report: FolderReport) -> None:
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith("."):
            report.skipped.append((name, "hidden (a leftover temporary or tool file)"))
        elif entry.is_dir():
            report.skipped.append((name + "/", "sub-folder (not part of the checkpoint)"))
        elif name.endswith(_PICKLES):
            report.skipped.append((name, "pickle file (not read by from_pretrained; unsafe to share)"))
        elif name.endswith(".pyc"):
            report.skipped.append((name, "compiled Python"))
        elif entry.is_file():
            report.files.append((name, entry.stat().st_size))


def _check_config(folder: Path, report: FolderReport) -> None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        report.problems.append("config.json is missing; save the model with model.save_pretrained(DIR)")
        return
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.problems.append(f"config.json is not valid JSON ({exc})")
        return
    from ..modeling import Nemotron3Config

    if raw.get("model_type") not in ("nemotron_h", "nemotron3"):
        report.problems.append(
            f"config.json has model_type={raw.get('model_type')!r}; a Nemotron 3 checkpoint has 'nemotron_h'"
        )
    try:
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
        report.config = Nemotron3Config.from_dict(fields)
    except Exception as exc:  # noqa: BLE001 - any config error is reported, not raised
        report.problems.append(f"config.json does not build a Nemotron3Config: {type(exc).__name__}: {exc}")


def _check_code(folder: Path, report: FolderReport) -> None:
    from transformers.dynamic_module_utils import get_relative_imports

    config_file = folder / "config.json"
    try:
        auto_map = json.loads(config_file.read_text()).get("auto_map") if config_file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # already reported by _check_config
    if not auto_map:
        report.warnings.append("config.json has no auto_map: trust_remote_code=True would fall back to "
                               "transformers' native NemotronH (no MTP)")
        return
    pending: list[tuple[str, str]] = []  # (module file, who needs it)
    for auto_class, reference in sorted(auto_map.items()):
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if not isinstance(reference, str) or "." not in reference:
            report.problems.append(f"auto_map[{auto_class!r}] = {reference!r} is not 'module.ClassName'")
            continue
        if "--" in reference:
            report.warnings.append(f"auto_map[{auto_class!r}] = {reference!r} points at another repo; not checked")
            continue
        module, class_name = reference.rsplit(".", 1)
        code = folder / f"{module}.py"
        if not code.is_file():
            report.problems.append(f"auto_map[{auto_class!r}] needs {module}.py, which is missing from the folder")
        elif f"class {class_name}" not in code.read_text(encoding="utf-8"):
            report.problems.append(f"auto_map[{auto_class!r}] names {class_name}, which {module}.py does not define")
        else:
            pending.append((f"{module}.py", f"auto_map[{auto_class!r}]"))
    seen: set[str] = set()
    while pending:  # follow single-dot imports the way transformers' get_relative_import_files does
        name, needed_by = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if not (folder / name).is_file():
            report.problems.append(f"{name} is missing: {needed_by} imports it; save again with save_pretrained "
                                   "so every modeling file is copied")
            continue
        for imported in sorted(get_relative_imports(folder / name)):
            if imported.startswith("."):
                report.problems.append(f"{name} has a double-dot import (from ..{imported[1:]}); remote code "
                                       "allows only single-dot imports between files of the folder")
            else:
                pending.append((imported.replace(".", "/") + ".py", name))


def _check_weights(folder: Path, report: FolderReport) -> None:
    from safetensors import safe_open

    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        report.problems.append("no *.safetensors weights in the folder; save with model.save_pretrained(DIR)")
        return
    contents: dict[str, set[str]] = {}
    dtypes: set[str] = set()
    n_params = 0
    embedding_shape = None
    for shard in shards:
        try:
            with safe_open(str(folder / shard), framework="pt") as handle:
                keys = set(handle.keys())
                for key in keys:
                    tensor = handle.get_slice(key)
                    n_params += math.prod(tensor.get_shape())
                    dtypes.add(tensor.get_dtype())
                    if key.endswith(("embeddings.weight", "embed_tokens.weight", "embedding.weight")):
                        embedding_shape = tuple(tensor.get_shape())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            report.problems.append(f"{shard} cannot be read ({exc}); the file is truncated or corrupt, save again")
            continue
        contents[shard] = keys
    report.num_parameters, report.weight_dtypes = n_params, sorted(dtypes)
    index_file = folder / SAFE_INDEX
    if index_file.is_file():
        _check_index(index_file, shards, contents, report)
    elif len(shards) > 1:
        report.problems.append(f"{len(shards)} safetensors files but no {SAFE_INDEX}: from_pretrained cannot "
                               "tell which tensors live where; save again with save_pretrained")
    config = report.config
    if config is not None and embedding_shape is not None:
        want = (config.vocab_size, config.hidden_size)
        if embedding_shape != want:
            report.problems.append(f"the embedding has shape {embedding_shape} but config.json says "
                                   f"vocab_size x hidden_size = {want}; config.json does not belong to these weights")


def _check_index(index_file: Path, shards: list[str], contents: dict[str, set[str]], report: FolderReport) -> None:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        report.problems.append(f"{SAFE_INDEX} is unreadable ({type(exc).__name__}: {exc}); save again")
        return
    named = set(weight_map.values())
    for shard in sorted(named - set(shards)):
        report.problems.append(f"{SAFE_INDEX} names shard {shard}, which is missing from the folder")
    for shard in sorted(set(shards) - named):
        report.warnings.append(f"{shard} is not in {SAFE_INDEX} (a stale shard?): it is uploaded but never loaded")
    for shard, keys in contents.items():
        listed = {k for k, s in weight_map.items() if s == shard}
        if listed != keys:
            missing, extra = sorted(listed - keys), sorted(keys - listed)
            report.problems.append(
                f"{SAFE_INDEX} disagrees with {shard}: {len(missing)} listed tensor(s) not in the shard "
                f"{missing[:3]}, {len(extra)} tensor(s) in the shard not listed {extra[:3]}"
            )


def _check_generation_config(folder: Path, report: FolderReport) -> None:
    if not (folder / "generation_config.json").is_file():
        report.warnings.append("generation_config.json is missing: generate() falls back to config defaults "
                               "(e.g. only one eos id); save model.generation_config too")
        return
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001
        report.problems.append(f"generation_config.json does not load ({type(exc).__name__}: {exc})")


def _check_tokenizer(folder: Path, report: FolderReport, required: bool) -> None:
    complain = report.problems.append if required else report.warnings.append
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        complain("no tokenizer (tokenizer.json / tokenizer_config.json): save it next to the model with "
                 "tokenizer.save_pretrained(DIR)")
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - any loading error is the finding
        complain(f"the tokenizer does not load ({type(exc).__name__}: {exc}); save it again with "
                 "tokenizer.save_pretrained(DIR)")
        return
    if not getattr(tokenizer, "chat_template", None):
        complain(f"the tokenizer has no chat template ({' / '.join(CHAT_TEMPLATE_FILES)} or 'chat_template' in "
                 "tokenizer_config.json): set tokenizer.chat_template before saving")
    config = report.config
    if config is not None and len(tokenizer) > config.vocab_size:
        report.problems.append(f"the tokenizer has {len(tokenizer)} tokens but config.json vocab_size is "
                               f"{config.vocab_size}: ids past the embedding would crash; resize the embeddings")


def _read_training_summary(folder: Path, report: FolderReport) -> None:
    summary_file = folder / SUMMARY_FILE
    if not summary_file.is_file():
        return
    try:
        summary = json.loads(summary_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.warnings.append(f"{SUMMARY_FILE} is not valid JSON ({exc}); the model card leaves it out")
        return
    if isinstance(summary, dict):
        report.training_summary = summary
    else:
        report.warnings.append(f"{SUMMARY_FILE} holds a {type(summary).__name__}, not an object; left out of the card")


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
