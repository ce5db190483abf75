"""transformers-nemotron3: NVIDIA Nemotron 3 for the Hugging Face stack."""

__version__ = "0.1.0"
