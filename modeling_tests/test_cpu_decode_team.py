"""The threads of a fused decode step (cpu_kernels/team.h) and its attention kernel.

A decode step runs in one OpenMP region, its products handed out by atomic counters to the calling thread
and the region's other threads (helpers that read ahead the next weights), and its attention in C++ rather
than ATen's sdpa. Checked against the module path with the kernels off: several new tokens at once through
the causal attention kernel, a forked child, concurrent decoding threads, other thread counts and the team
switched off by environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from tiny_configs import randomize, tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM, cpu_kernels


def _model(pattern: str = "M*E-ME", dtype: torch.dtype = torch.float32) -> Nemotron3ForCausalLM:
    torch.manual_seed(31)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks", hybrid_override_pattern=pattern)).eval()
    randomize(model, std=0.08, seed=32)
    return model.to(dtype)


def _continuation_logits(model, ids: torch.Tensor, prompt: int, step: int, on: bool) -> torch.Tensor:
    """Logits of ids[:, prompt:] fed ``step`` tokens per call after a prefill of ``prompt`` tokens."""
    cpu_kernels.enable_cpu_kernels(model, on)
    with torch.inference_mode():
        cache = model(ids[:, :prompt], use_cache=True).past_key_values
        out = [model(ids[:, t : t + step], cache=cache, use_cache=True).logits for t in range(prompt, ids.shape[1], step)]
    return torch.cat(out, 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_several_new_tokens_attend_causally(kernels, dtype, tol):
    # no Mamba block: a step of several tokens per sequence is one fused call (causal among the new tokens,
    # GQA 4 query heads on 2 key/value heads), past the 64 preallocated key/value columns
    model = _model("*E*-", dtype)
    ids = torch.randint(3, 96, (2, 82))
    kernels.calls.clear()
    on = _continuation_logits(model, ids, 10, 4, True)
    assert "decode_step" in kernels.calls
    off = _continuation_logits(model, ids, 10, 4, False)
    torch.testing.assert_close(on, off, atol=tol, rtol=tol)


def test_forked_child_decodes(kernels):
    # the parent has run fused steps (its OpenMP workers were the team's helpers) when it forks; a child,
    # which like any PyTorch child must run on one thread (the OpenMP pool does not survive fork), decodes
    # on from the same cache without waiting for threads that are gone
    model = _model()
    ids = torch.randint(3, 96, (1, 16))
    expected = _continuation_logits(model, ids, 10, 1, False)
    cpu_kernels.enable_cpu_kernels(model, True)
    with torch.inference_mode():
        cache = model(ids[:, :10], use_cache=True).past_key_values
        parent = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in (10, 11)]
    torch.testing.assert_close(torch.cat(parent, 1), expected[:, :2], atol=1e-4, rtol=1e-4)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            with torch.inference_mode():
                got = torch.cat([model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(12, 16)], 1)
            code = 0 if torch.allclose(got, expected[:, 2:], atol=1e-4, rtol=1e-4) else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's decode steps hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


def test_concurrent_decoding_threads_equal_one_at_a_time(kernels):
    model = _model()
    prompts = [torch.randint(3, 96, (1, 8)) for _ in range(3)]

    def generate(p):
        with torch.inference_mode():
            return model.generate(p, max_new_tokens=12, min_new_tokens=12, do_sample=False)

    alone = [generate(p) for p in prompts]
    results = [None] * len(prompts)

    def worker(i):
        results[i] = generate(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a decoding thread hung"
    for a, b in zip(alone, results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 3])
def test_other_thread_counts(kernels, threads):
    model = _model()
    ids = torch.randint(3, 96, (2, 14))
    expected = _continuation_logits(model, ids, 10, 1, False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _continuation_logits(model, ids, 10, 1, True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_team_switched_off_by_environment(kernels, tmp_path):
    model = _model()
    ids = torch.randint(3, 96, (1, 14))
    on = _continuation_logits(model, ids, 10, 1, True)
    torch.save({"state": model.state_dict(), "ids": ids, "on": on}, tmp_path / "case.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from tiny_configs import tiny_config
from transformers_nemotron3 import Nemotron3ForCausalLM, cpu_kernels
torch.set_num_threads(2)
case = torch.load({str(tmp_path / "case.pt")!r})
model = Nemotron3ForCausalLM(tiny_config("all_blocks", hybrid_override_pattern="M*E-ME")).eval()
model.load_state_dict(case["state"])
assert cpu_kernels.enable_cpu_kernels(model)
ids = case["ids"]
with torch.inference_mode():
    cache = model(ids[:, :10], use_cache=True).past_key_values
    got = torch.cat([model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(10, 14)], 1)
torch.testing.assert_close(got, case["on"], atol=1e-4, rtol=1e-4)
print("ok")
"""
    env = {**os.environ, "NEMOTRON3_DECODE_TEAM": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
