"""transformers' common model tests (from the transformers 5.25.0 sdist), importable by our test modules.

Not collected on its own (see ``modeling_tests/conftest.py``): only modules that subclass the mixins run them.
"""
