"""`accelerate launch --num_processes 2` of examples/parallel/train_parallel.py (CP=2 x EP=2 folded on 2 CPU
processes) trains: the loss goes down and the replicated weights stay identical on both ranks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transformers_nemotron3.parallel.spawn import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not installed")
def test_accelerate_launch_example_trains():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = env.get("PYTHONPATH", src) if "PYTHONPATH" in env else src
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples/parallel/accelerate_cpu_2proc.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "examples/parallel/train_parallel.py"),
           "--ep", "2", "--cp", "2", "--steps", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    match = re.search(r"first loss ([\d.]+) -> last loss ([\d.]+)", out)
    assert match, out[-3000:]
    assert float(match.group(2)) < float(match.group(1)) - 0.1, match.group(0)
    spread = re.search(r"checksum spread over ranks: ([\d.e+-]+)", out)
    assert spread and float(spread.group(1)) == 0.0, out[-2000:]
