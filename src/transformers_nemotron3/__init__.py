"""transformers-nemotron3: NVIDIA Nemotron 3 (hybrid Mamba-2 / attention MoE) for the Hugging Face stack.

Importing the package registers ``model_type="nemotron3"`` with transformers' Auto classes.
"""


from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import (
    Nemotron3Config,
    Nemotron3ForCausalLM,
    Nemotron3HybridCache,
    Nemotron3Model,
    Nemotron3PreTrainedModel,
)
from . import upcycling  # noqa: E402,F401  (attaches Nemotron3ForCausalLM.from_dense)
from .cpu_kernels import cpu_kernels_enabled, enable_cpu_kernels

__version__ = "0.1.0"

def _publish_saved(folder, repo_id: str, *, private: bool = False, token: str | None = None,
                   commit_message: str | None = None) -> None:
    """`save_pretrained(push_to_hub=True)`: the folder goes through `nemotron3 publish` (checks, model card)."""
    from .publish import publish

    publish(folder, repo_id, private=private, token=token, commit_message=commit_message, require_tokenizer=False)


Nemotron3PreTrainedModel.hub_uploader = staticmethod(_publish_saved)

AutoConfig.register("nemotron3", Nemotron3Config, exist_ok=True)
AutoModel.register(Nemotron3Config, Nemotron3Model, exist_ok=True)
AutoModelForCausalLM.register(Nemotron3Config, Nemotron3ForCausalLM, exist_ok=True)

__all__ = [
    "Nemotron3Config",
    "Nemotron3Model",
    "Nemotron3ForCausalLM",
    "Nemotron3PreTrainedModel",
    "Nemotron3HybridCache",
    "enable_cpu_kernels",
    "cpu_kernels_enabled",
    "__version__",
]
