"""The Nemotron 3 model: single-device, exportable as remote code (see docs/architecture.md)."""

from .cache import Nemotron3HybridCache
from .configuration_nemotron3 import Nemotron3Config
from .modeling_nemotron3 import Nemotron3ForCausalLM, Nemotron3Model, Nemotron3PreTrainedModel

__all__ = ["Nemotron3Config", "Nemotron3Model", "Nemotron3ForCausalLM", "Nemotron3PreTrainedModel",
           "Nemotron3HybridCache"]
