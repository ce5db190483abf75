"""Every script in examples/ runs as its docstring says, at its smallest setting (``--steps 1``, tiny sizes),
in a fresh Python; the multi-process ones through a real ``accelerate launch --config_file
examples/accelerate_cpu_2proc.yaml`` that must start 2 processes (each rank reports itself).

About 2 minutes on 2 shared cores, mostly process start-up (import torch + transformers per process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transformers_nemotron3.parallel.spawn import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TWO_PROCESSES = EXAMPLES / "accelerate_cpu_2proc.yaml"
TESTED = {"sft.py", "grpo_multi_env.py", "chat.py", "upcycle.py", "nvfp4_train.py", "dgs_train.py",
          "parallel/train_parallel.py"}


def run(args: list[str], timeout: float = 240, launch: bool = False, expect_ok: bool = True) -> str:
    """Run an example (``launch``: under ``accelerate launch`` with the 2-process CPU config); return its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TRL_EXPERIMENTAL_SILENCE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    prefix = [sys.executable]
    if launch:
        prefix += ["-m", "accelerate.commands.launch", "--config_file", str(TWO_PROCESSES),
                   "--main_process_port", str(free_port())]
    proc = subprocess.run(prefix + [str(EXAMPLES / args[0])] + args[1:], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    out = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, out[-4000:]
    else:
        assert proc.returncode != 0, out[-4000:]
    return out


def test_every_example_is_tested():
    scripts = {str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.py")}
    assert scripts == TESTED, f"untested examples: {sorted(scripts - TESTED)}; gone: {sorted(TESTED - scripts)}"


def test_sft_one_step(tmp_path):
    out = run(["sft.py", "--steps", "1", "--output-dir", str(tmp_path)])
    assert "1 steps on 1 process(es)" in out, out[-2000:]
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert any("lm_loss" in row and "mtp_loss" in row for row in history)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_sft_lora_one_step(tmp_path):
    pytest.importorskip("peft", reason="the --lora example needs PEFT (pip install peft)")
    out = run(["sft.py", "--steps", "1", "--lora", "--output-dir", str(tmp_path)])
    trained, total = map(lambda s: int(s.replace(",", "")),
                         re.search(r"trained ([\d,]+) of ([\d,]+) parameters \(LoRA\)", out).groups())
    assert 0 < trained < total / 4
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_sft_on_two_processes_with_accelerate_launch(tmp_path):
    out = run(["sft.py", "--steps", "1", "--output-dir", str(tmp_path)], launch=True)
    for rank in (0, 1):
        assert f"process {rank} of 2 (DistributedType.MULTI_CPU) ready" in out, out[-3000:]
    assert "1 steps on 2 process(es)" in out


def test_grpo_one_step_writes_plots(tmp_path):
    out = run(["grpo_multi_env.py", "--steps", "1", "--output-dir", str(tmp_path)])
    assert "1 steps, 16 rows" in out, out[-2000:]
    shares = [float(s) for s in re.findall(r"share ([\d.]+)", out)]
    assert shares and sum(shares) == pytest.approx(1.0, abs=0.02)
    assert (tmp_path / "reward.png").stat().st_size > 1000 and (tmp_path / "loss.png").stat().st_size > 1000


def test_chat_thinking_on_with_budget_and_off(tmp_path):
    budget = 4
    out = run(["chat.py", "--build-tiny", str(tmp_path / "ckpt"), "--budget", str(budget), "--max-new-tokens", "16"])
    generated = int(re.search(r"\[reasoning: (\d+) generated tokens, closed\]", out).group(1))
    # the budget counts from <think>, including the newline the prompt ends with
    assert generated == budget - 1, out[-2000:]
    out = run(["chat.py", str(tmp_path / "ckpt"), "--thinking", "off", "--max-new-tokens", "4"])
    assert "[answer]" in out and "[reasoning" not in out
    out = run(["chat.py", str(tmp_path / "ckpt"), "--thinking", "off", "--budget", "4"], expect_ok=False)
    assert "ValueError" in out and "--budget 4" in out


def test_upcycle_preserves_the_function_then_trains(tmp_path):
    out = run(["upcycle.py", "--tiny-dense", str(tmp_path / "dense"), str(tmp_path / "moe"), "--steps", "1"])
    diff = float(re.search(r"max \|logit difference\| at step 0: ([\d.e+-]+)", out).group(1))
    assert diff < 1e-5
    assert "trained 1 steps" in out and (tmp_path / "moe" / "config.json").exists()


def test_nvfp4_one_step():
    out = run(["nvfp4_train.py", "--steps", "1"])
    quantized = re.search(r"(\d+)/(\d+) linear/expert modules in NVFP4", out)
    assert quantized and int(quantized.group(1)) > 0, out[-2000:]
    assert "NVFP4: loss" in out and "BF16:  loss" in out


def test_dgs_on_two_processes_with_accelerate_launch():
    out = run(["dgs_train.py", "--steps", "2"], launch=True)
    assert re.search(r"rank 0/2 server: 2 updates", out), out[-3000:]
    assert re.search(r"rank 1/2 worker: \d+ steps", out), out[-3000:]


def test_expert_and_context_parallel_one_step_with_accelerate_launch():
    out = run(["parallel/train_parallel.py", "--ep", "2", "--cp", "2", "--steps", "1"], launch=True)
    assert "world=2" in out and "checksum spread over ranks: 0.000e+00" in out, out[-3000:]
