"""Code environment and its sandbox: right, wrong, malformed and hostile submissions."""

import os
import time

import pytest

from transformers_nemotron3.trainers.environments import CodeEnvironment
from transformers_nemotron3.trainers.environments.sandbox import run_tests

TASK = {"function": "add", "description": "add(a, b) returns a + b",
        "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
GOOD = "def add(a, b):\n    return a + b\n"


def score(code, **kw):
    return CodeEnvironment(time_limit=1.0, **kw).score(TASK, f"```python\n{code}```")


def test_right_answer():
    assert score(GOOD) == 1.0
    assert CodeEnvironment().score(TASK, "Here:\n```python\n" + GOOD + "```\nDone.") == 1.0


def test_wrong_answers_get_partial_or_no_credit():
    assert score("def add(a, b):\n    return 3\n") == 0.5
    assert score("def add(a, b):\n    return a - b\n") == 0.0


@pytest.mark.parametrize("answer", ["", "add them", "```python\ndef add(a, b) return\n```", "```python\ndef sub(a, b):\n"
                                    "    return a - b\n```"])
def test_malformed_answers_score_zero(answer):
    assert CodeEnvironment(time_limit=1.0).score(TASK, answer) == 0.0


HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "loop_in_call": "def add(a, b):\n    while True:\n        pass\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "multiprocessing": "import multiprocessing\n",
    "subprocess": "import subprocess\nsubprocess.run(['touch', '{outside}/pwned_sp'])\n",
    "huge_allocation": "x = bytearray(10**11)\n",
    "huge_list": "x = [0] * (10**10)\n",
    "write_outside": "open('{outside}/pwned_w', 'w').write('x')\n",
    "os_open_outside": "import os\nos.close(os.open('{outside}/pwned_o', os.O_CREAT | os.O_WRONLY))\n",
    "delete_outside": "import shutil\nshutil.rmtree('{outside}/keep')\n",
    "remove_outside": "import os\nos.remove('{outside}/keep/file')\n",
    "escape_dir": "import os\nos.chdir('{outside}')\nopen('pwned_c', 'w').write('x')\n",
    "symlink_out": "import os\nos.symlink('{outside}', 'link')\nopen('link/pwned_l', 'w').write('x')\n",
    "forged_result": "print('{{\"passed\": 2, \"total\": 2}}')\nimport os\nos._exit(0)\n",
    "kill_parent": "import os\nos.kill(os.getppid(), 9)\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_code_scores_zero_and_harms_nothing(name, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("precious")
    code = HOSTILE[name].format(outside=tmp_path)
    if "def add" not in code:
        code += GOOD  # a correct function after the attack
    start = time.monotonic()
    assert score(code) == 0.0
    assert time.monotonic() - start < 5.0
    assert (keep / "file").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_no_inherited_secrets_and_private_workdir(monkeypatch):
    monkeypatch.setenv("NEMOTRON3_TEST_SECRET", "hunter2")
    code = GOOD + "import os\nassert 'NEMOTRON3_TEST_SECRET' not in os.environ\nassert os.getcwd() != %r\n" % os.getcwd()
    assert run_tests(code, TASK["tests"], time_limit=2.0).passed == 2


def test_time_limit_reported():
    result = run_tests("while True:\n    pass\n", TASK["tests"], time_limit=0.5)
    assert result.timed_out and result.passed == 0
