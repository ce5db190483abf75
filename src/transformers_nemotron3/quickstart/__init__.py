"""`nemotron3 quickstart`: the life of a Nemotron 3 model in small (see ``runner.py``).

One file per stage (``stage_<name>.py``: ``run(ctx) -> (metrics, message)`` and ``check(metrics) -> problem or
None``), the synthetic data (``data.py``), the shared state (``context.py``), sizes (``sizes.py``), the
held-out measurements (``evaluate.py``) and the summary table and plots (``summary.py``).
"""

from .runner import STAGES, TRAINING_STAGES, main, parse_stages

__all__ = ["main", "STAGES", "TRAINING_STAGES", "parse_stages"]
