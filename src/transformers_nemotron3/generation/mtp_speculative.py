"""MTP self-speculative decoding (implemented in ``modeling/speculative.py`` so it ships with remote code).

``model.generate(input_ids, use_mtp=True, num_draft_tokens=k)`` is the usual entry point;
:func:`mtp_generate` returns acceptance statistics as well.
"""

from ..modeling.speculative import greedy_generate, mtp_generate

__all__ = ["mtp_generate", "greedy_generate"]
