"""The model card (README.md) written for a published Nemotron 3 checkpoint.

The card is a ``huggingface_hub.ModelCard``: YAML metadata the Hub indexes (``library_name: transformers``,
``pipeline_tag: text-generation``, tags ``nemotron3`` / ``nemotron_h`` / ``custom_code``), then Markdown:

- an architecture table read from ``config.json`` (layer pattern with a legend and per-type counts, sizes,
  experts, LatentMoE, MTP) and the parameter count read from the safetensors headers;
- how to load it with this package, with plain transformers + ``trust_remote_code`` (our code, MTP included),
  and with plain transformers' native NemotronH (no remote code, MTP ignored);
- the training summary as a table when the folder has ``training_summary.json`` (keys free-form; nested
  objects flattened to dotted keys).
"""

from __future__ import annotations

import json

from huggingface_hub import ModelCard, ModelCardData

from .checks import SUMMARY_FILE, FolderReport

TAGS = ["nemotron3", "nemotron_h", "custom_code"]
_BLOCK_NAMES = {"M": "Mamba-2", "*": "attention", "E": "MoE", "-": "MLP"}


def build_model_card(report: FolderReport, repo_id: str) -> ModelCard:
    """Write the card for the checked folder ``report`` as it will live at ``repo_id`` on the Hub.

    Args:
        report: the result of :func:`check_folder` (its config, parameter count and training summary are used).
        repo_id: ``namespace/name`` used in the load snippets.

    Returns:
        A ``ModelCard``; ``str(card)`` is the README.md text, ``card.data`` its metadata.
    """
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=list(TAGS))
    sections = [
        f"# {repo_id.split('/')[-1]}",
        "A Nemotron 3 (hybrid Mamba-2 / attention mixture-of-experts) checkpoint in NVIDIA's official layout "
        "(`model_type: nemotron_h`), published with "
        "[transformers-nemotron3](https://pypi.org/project/transformers-nemotron3/). The modeling code is "
        "included, so plain transformers loads it with `trust_remote_code=True`.",
        "## Architecture\n\n" + architecture_table(report),
        "## How to load\n\n" + load_snippets(repo_id),
    ]
    if report.training_summary:
        sections.append(f"## Training summary\n\nFrom `{SUMMARY_FILE}`:\n\n" + summary_table(report.training_summary))
    body = "\n\n".join(sections) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def architecture_table(report: FolderReport) -> str:
    """A Markdown table of the architecture read from the checked config (empty note without one)."""
    config = report.config
    if config is None:
        return "_config.json could not be read._"

    def get(name: str, default="?"):
        value = getattr(config, name, None)
        return default if value is None else value

    pattern = str(get("hybrid_override_pattern", ""))
    counts = ", ".join(f"{pattern.count(c)} {name}" for c, name in _BLOCK_NAMES.items() if pattern.count(c))
    rows = [
        ("layers", f"{len(pattern)} ({counts})"),
        ("layer pattern", f"`{pattern}` (M = Mamba-2, * = attention, E = MoE, - = MLP)"),
        ("hidden size", get("hidden_size")),
        ("vocabulary", get("vocab_size")),
        ("attention", f"{get('num_attention_heads')} heads, {get('num_key_value_heads')} KV heads, "
                      f"head dim {get('head_dim')}"),
        ("Mamba-2", f"{get('mamba_num_heads')} heads x {get('mamba_head_dim')}, state {get('ssm_state_size')}, "
                    f"{get('n_groups')} groups"),
    ]
    if "E" in pattern:
        rows.append(("experts", f"{get('n_routed_experts')} routed, top-{get('num_experts_per_tok')}, "
                                f"{get('n_shared_experts', 0)} shared, expert size {get('moe_intermediate_size')}"))
        if get("moe_latent_size", None):
            rows.append(("LatentMoE", f"experts run in a {get('moe_latent_size')}-wide latent space"))
    mtp = int(get("num_nextn_predict_layers", 0))
    rows.append(("MTP", f"{mtp} head(s), pattern `{get('mtp_hybrid_override_pattern', '')}`" if mtp else "none"))
    if report.num_parameters:
        rows.append(("parameters", f"{report.num_parameters / 1e9:.3g}B" if report.num_parameters >= 1e8
                     else f"{report.num_parameters / 1e6:.3g}M"))
    if report.weight_dtypes:
        rows.append(("weights", ", ".join(report.weight_dtypes) + " safetensors"))
    return _table(("", ""), rows)


def load_snippets(repo_id: str) -> str:
    """Markdown with three ways to load ``repo_id``: this package, remote code, transformers' native class."""
    return f"""With this package (`pip install transformers-nemotron3`), CPU or GPU, MTP included:

```python
import transformers_nemotron3  # registers Nemotron 3 with transformers' Auto classes
from transformers import AutoTokenizer
from transformers_nemotron3 import Nemotron3ForCausalLM

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = Nemotron3ForCausalLM.from_pretrained("{repo_id}", dtype="auto")
messages = [{{"role": "user", "content": "Hello!"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False,
                                       return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))
```

Without the package, with the modeling code shipped in this repo (MTP included):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True, dtype="auto")
```

Without the package and without remote code, transformers' native `NemotronHForCausalLM` reads the same
weights (the MTP head, if any, is ignored):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")
```"""


def summary_table(summary: dict) -> str:
    """``training_summary.json`` as a two-column Markdown table; nested objects become dotted keys."""
    rows = [(key, _cell(value)) for key, value in _flatten(summary)]
    return _table(("key", "value"), rows)


def _flatten(mapping: dict, prefix: str = ""):
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, str], rows) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)
