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
    """The optional CPU kernels, built, behind a call-recording spy for one test (models switch them on with
    ``enable_cpu_kernels(model)``). They build with the machine's C++ compiler; without one the test skips."""
    from transformers_nemotron3.cpu_kernels import build

    real = build.kernel_ops()
    if real is None:
        pytest.skip(f"CPU kernels unavailable here: {build.unavailable_reason()}")
    spy = _Spy(real)
    monkeypatch.setattr(build, "kernel_ops", lambda: spy)
    yield spy


def pytest_configure(config):
    """The markers transformers' vendored common tests use (transformers declares them in its pyproject.toml)."""
    for name in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                 "all_flash_attn_test", "torch_compile_test", "slow"):
        config.addinivalue_line("markers", f"{name}: transformers common-test marker (see transformers_tests/)")
