"""``python -m transformers_nemotron3.quickstart``: the same as ``nemotron3 quickstart``."""

from .runner import main

raise SystemExit(main())
