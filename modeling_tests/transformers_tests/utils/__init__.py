"""Stand-ins for the transformers test modules that the 5.25.0 sdist does not ship (see ../README.md)."""
