"""Publishing a saved Nemotron 3 checkpoint to the Hugging Face Hub: folder checks, model card, upload.

- :func:`check_folder` tells whether a folder would load (and as a chat model) and what would be uploaded;
- :func:`build_model_card` writes the README.md (Hub metadata, architecture, load snippets, training summary);
- :func:`publish` checks, writes the card and uploads through ``huggingface_hub`` (``nemotron3 publish``);
- :func:`push_model_to_hub` is the same for an in-memory model (what ``push_to_hub`` should call).
"""

from .checks import SUMMARY_FILE, FolderReport, check_folder
from .hub import PublishResult, probe_hub, publish
from .model_card import build_model_card
from .push import push_model_to_hub

__all__ = ["FolderReport", "PublishResult", "SUMMARY_FILE", "build_model_card", "check_folder", "probe_hub",
           "publish", "push_model_to_hub"]
