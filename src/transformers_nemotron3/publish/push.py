"""``push_model_to_hub``: save an in-memory model (and tokenizer) to a temporary folder, then :func:`publish` it.

This is what ``Nemotron3ForCausalLM.push_to_hub`` / ``save_pretrained(push_to_hub=True)`` should route to, so a
push from Python gets the same folder checks and model card as ``nemotron3 publish``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .checks import SUMMARY_FILE
from .hub import PublishResult, publish


def push_model_to_hub(
    model,
    repo_id: str,
    *,
    tokenizer=None,
    training_summary: dict | None = None,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    max_shard_size: int | str = "5GB",
    dry_run: bool = False,
    timeout: float = 10.0,
) -> PublishResult:
    """Save ``model`` (and ``tokenizer``, and ``training_summary`` as ``training_summary.json``) and publish it.

    Args:
        model: a Nemotron 3 model with ``save_pretrained``.
        repo_id: ``namespace/name`` on the Hub.
        tokenizer: saved next to the model when given; without it the folder check only warns about the missing
            tokenizer (push it separately with ``tokenizer.push_to_hub(repo_id)``).
        training_summary: free-form key/values rendered as a table in the model card.
        private, token, endpoint, commit_message, dry_run, timeout: as in :func:`publish`.
        max_shard_size: passed to ``save_pretrained``.
    """
    if training_summary is not None and not isinstance(training_summary, dict):
        raise ValueError(f"training_summary must be a dict of key/values, got {type(training_summary).__name__}.")
    with tempfile.TemporaryDirectory(prefix="nemotron3-push-") as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if training_summary is not None:
            (Path(folder) / SUMMARY_FILE).write_text(json.dumps(training_summary, indent=2, default=str) + "\n")
        return publish(folder, repo_id, private=private, dry_run=dry_run, token=token, endpoint=endpoint,
                       commit_message=commit_message, require_tokenizer=tokenizer is not None, timeout=timeout)
