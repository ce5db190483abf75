"""Run untrusted Python in a separate, locked-down process and count the unit tests it passes.

Layers (each one alone is leaky; together they hold for the hostile cases the tests try):

* a fresh interpreter (``python -I -S``: no site, no user paths, no ``PYTHON*`` variables) started in its
  own session, in a new temporary working directory that is deleted afterwards;
* a scrubbed environment: only ``PATH``, ``HOME`` and ``TMPDIR`` (pointing into the directory), so no
  inherited secrets;
* ``resource.setrlimit``: address space (memory), CPU seconds, file size, open files and processes;
* a wall-clock timeout, after which the whole process group is killed;
* a ``sys.addaudithook`` installed before the submission runs: no fork/exec/spawn/subprocess, no sockets,
  no ctypes, no signals to other processes, and no writes, deletes, renames or mkdirs outside the working
  directory.

The runner reports ``{"passed": k, "total": n}`` on a line tagged with a random nonce; output without it
scores 0. (An in-process harness cannot be proof against a submission that digs the nonce out of the
runner's memory; this guards against accidents and crude reward hacking, not against a determined attacker.)
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

__all__ = ["SandboxResult", "run_tests"]

_RUNNER = r'''
import sys, os, json
NONCE = sys.stdin.readline().strip()
ROOT = os.path.realpath(os.getcwd())
_BLOCKED = ("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.kill",
            "os.killpg", "os.putenv", "os.unsetenv", "subprocess.Popen", "pty.spawn", "socket.",
            "ctypes.", "sys.setrecursionlimit")
_BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "multiprocessing", "pty"}
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                "os.chdir", "os.chroot", "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr"}

def _inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    path = os.path.realpath(os.fspath(path))
    return path == ROOT or path.startswith(ROOT + os.sep)

def _hook(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "import" and args and str(args[0]).split(".")[0] in _BLOCKED_IMPORTS:
        raise PermissionError("sandbox: import " + str(args[0]) + " is not allowed")
    if event == "open" and args and args[0] is not None:
        mode, flags = (args[1] or "r"), (args[2] or 0)
        writing = any(c in str(mode) for c in "wax+") or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writing and not _inside(args[0]):
            raise PermissionError("sandbox: writing outside the working directory")
    if event in _PATH_EVENTS:
        for arg in args[:2]:
            if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg):
                raise PermissionError("sandbox: " + event + " outside the working directory")
        if event in ("os.symlink", "os.link", "os.chroot", "os.chdir"):
            raise PermissionError("sandbox: " + event + " is not allowed")

with open("solution.py") as f:
    SOLUTION = f.read()
with open("tests.json") as f:
    TESTS = json.load(f)
_write = sys.__stdout__.write
_flush = sys.__stdout__.flush
sys.addaudithook(_hook)
passed = 0
namespace = {"__name__": "solution"}
try:
    exec(compile(SOLUTION, "solution.py", "exec"), namespace)
    for test in TESTS:
        try:
            exec(compile(test, "test", "exec"), dict(namespace))
            passed += 1
        except BaseException:
            pass
except BaseException:
    pass
_write("\n" + NONCE + json.dumps({"passed": passed, "total": len(TESTS)}) + "\n")
_flush()
os._exit(0)
'''


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run: tests passed out of total, and why it stopped early if it did."""

    passed: int
    total: int
    timed_out: bool = False
    error: str = ""

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def _limits(memory_mb: int, cpu_s: int):
    def apply():
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        if os.getuid() != 0:  # root ignores RLIMIT_NPROC; the audit hook still refuses fork/spawn
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.umask(0o077)

    return apply


def run_tests(code: str, tests: list[str], time_limit: float = 5.0, memory_mb: int = 256) -> SandboxResult:
    """Run ``code`` then each test snippet (e.g. ``"assert add(1, 2) == 3"``) in the sandbox."""
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="nemotron3-sandbox-") as workdir:
        with open(os.path.join(workdir, "solution.py"), "w") as f:
            f.write(code)
        with open(os.path.join(workdir, "tests.json"), "w") as f:
            json.dump(list(tests), f)
        with open(os.path.join(workdir, "runner.py"), "w") as f:
            f.write(_RUNNER)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "runner.py"], cwd=workdir, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_limits(memory_mb, max(1, int(time_limit) + 1)), close_fds=True,
        )
        timed_out = False
        try:
            out, _ = proc.communicate((nonce + "\n").encode(), timeout=time_limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            out = b""
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the session holds anything it managed to start
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    if timed_out:
        return SandboxResult(0, len(tests), timed_out=True, error="time limit")
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith(nonce):
            try:
                result = json.loads(line[len(nonce):])
                return SandboxResult(int(result["passed"]), int(result["total"]))
            except (ValueError, KeyError, TypeError):
                break
    return SandboxResult(0, len(tests), error=f"no result (exit code {proc.returncode})")
