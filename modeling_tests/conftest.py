"""Shared test setup: deterministic seeds, small thread count, quiet logs."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tiny_configs, official_checkpoint, transformers_tests

# transformers' common test mixins, vendored: imported by test_transformers_common.py, never collected on their own
collect_ignore = ["transformers_tests"]

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class _Spy:
    """Stands in for ``torch.ops.nemotron3_cpu`` and records which kernels the model called."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.real, name)


@pytest.fixture
def kernels(monkeypatch):
    """The optional CPU kernels switched on for one test (behind a call-recording spy), off again afterwards.
    They build with the machine's C++ compiler; without one the test skips and says why."""
    from transformers_nemotron3 import cpu_kernels
    from transformers_nemotron3.modeling import fast_ops

    if not cpu_kernels.enable_cpu_kernels():
        pytest.skip(f"CPU kernels unavailable here: {cpu_kernels.cpu_kernels_unavailable_reason()}")
    spy = _Spy(torch.ops.nemotron3_cpu)
    real_enable = cpu_kernels.enable_cpu_kernels

    def enable(enabled: bool = True) -> bool:  # tests switch them on and off; "on" installs the spy
        on = real_enable(enabled)
        if on:
            fast_ops.ops = spy
        return on

    monkeypatch.setattr(cpu_kernels, "enable_cpu_kernels", enable)
    fast_ops.ops = spy
    yield spy
    real_enable(False)


def pytest_configure(config):
    """The markers transformers' vendored common tests use (transformers declares them in its pyproject.toml)."""
    for name in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                 "all_flash_attn_test", "torch_compile_test", "slow"):
        config.addinivalue_line("markers", f"{name}: transformers common-test marker (see transformers_tests/)")
