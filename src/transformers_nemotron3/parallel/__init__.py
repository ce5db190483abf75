"""Parallelism for Nemotron 3 from outside the model (placeholder, filled below)."""
