"""Stage ``save``: ``save_pretrained`` with remote code (the modeling files travel with the weights), the
tokenizer with its chat template, and ``training_summary.json`` (what each stage did, for the model card).

Check: the folder holds safetensors weights, a config.json whose ``auto_map`` names modeling files that are
there, the tokenizer and the training summary.
"""

from __future__ import annotations

import json
import os

from ..tokenizer import set_end_of_turn_eos
from .models import require_model, require_tokenizer
from .summary import write_training_summary

NAME = "save"


def folder_problems(folder: str) -> list[str]:
    """What a saved quickstart model folder lacks (empty when complete)."""
    files = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    problems = []
    if not any(f.endswith(".safetensors") for f in files):
        problems.append("no .safetensors weights")
    if "config.json" not in files:
        return problems + ["no config.json"]
    with open(os.path.join(folder, "config.json")) as f:
        auto_map = json.load(f).get("auto_map") or {}
    if "AutoModelForCausalLM" not in auto_map:
        problems.append("config.json has no auto_map for AutoModelForCausalLM")
    for ref in auto_map.values():
        module = ref.split("--")[-1].rsplit(".", 1)[0] + ".py"
        if module not in files:
            problems.append(f"auto_map names {module}, which is not in the folder")
    for needed in ("tokenizer.json", "training_summary.json"):
        if needed not in files:
            problems.append(f"no {needed}")
    return problems


def run(ctx) -> tuple[dict, str]:
    model = require_model(ctx).eval()
    tokenizer = require_tokenizer(ctx)
    folder = os.path.join(ctx.out, "model")
    set_end_of_turn_eos(model, tokenizer)  # generation stops at <|im_end|> as well as </s>, as the released configs
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ctx.saved = folder
    write_training_summary(ctx)
    files = sorted(os.listdir(folder))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files if f.endswith(".safetensors"))
    metrics = {"folder": folder, "files": files, "weights_mb": size / 2**20, "problems": folder_problems(folder)}
    py = [f for f in files if f.endswith(".py")]
    return metrics, f"{folder}: {size / 2**20:.1f} MB of weights, {len(py)} remote-code files, tokenizer, summary"


def check(metrics: dict) -> str | None:
    return "; ".join(metrics["problems"]) or None
