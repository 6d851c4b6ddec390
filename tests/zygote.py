"""`python -m metadist ...` for the tests, without paying for Python's start and torch's import
each time.

On a 2-core machine a fresh interpreter spends about 4 s importing torch and metadist and tearing
them down again, more than most of the commands the tests run. A zygote process imports them once
(no tensor made, no thread started), then forks one child per command. The child is a process of
its own, as a fresh one would be: its own working folder, environment, stdout and stderr (files),
exit status and signals; it runs the module as `python -m metadist` does (runpy, `__main__`) and
leaves as the interpreter does (threads joined, atexit handlers run, streams flushed).

What a fork cannot give a command goes to a fresh interpreter instead (`run` decides):
- an environment that differs from the zygote's in anything but the variables metadist and its
  libraries read while running (METADIST_*, OMNIGLOT_DIR, WANDB_*, XDG_CACHE_HOME; PYTEST_*, which
  names the running test): the kernel caps (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), thread
  counts and allocator settings are read when torch loads or first computes;
- a zygote whose imports started a thread (a fork would lose it), numpy's OpenBLAS pool aside;
- a second command while one runs (a test's own threads);
- METADIST_TEST_FRESH=1: every command in a fresh interpreter (to check the harness itself).
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# read while a command runs, never while torch or metadist loads (pytest's own: the test's name)
RUNTIME_ENV = ("METADIST_", "OMNIGLOT_DIR", "WANDB_", "XDG_CACHE_HOME", "PYTEST_")


# ------------------------------------------------------------------------------------ the zygote
def serve() -> None:
    """The zygote's loop: one JSON request a line on stdin, `{"pid": ...}` then `{"status": ...}`
    on stdout. Runs until stdin closes."""
    # numpy's OpenBLAS starts its thread pool on import and stops it around a fork (pthread_atfork);
    # nothing after it may start a thread
    import numpy  # noqa: F401

    base = _threads()
    import torch
    import torch._dynamo  # noqa: F401  (a torch optimizer's first use imports it: 2 s here)

    # not metadist.__main__: runpy runs it afresh as __main__ in each child, as `-m` does
    import metadist.config
    import metadist.evaluate
    import metadist.train  # noqa: F401

    gc.freeze()  # what the zygote holds stays out of the children's collections (and unwritten)
    requests = os.fdopen(0, "rb", buffering=0)
    _say({"ready": True, "threads_started": _threads() - base})
    for line in iter(requests.readline, b""):
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _become(req)  # never returns
        _say({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _say({"status": os.waitstatus_to_exitcode(status)})


def _threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1


def _say(msg: dict) -> None:
    os.write(1, (json.dumps(msg) + "\n").encode())


def _become(req: dict) -> None:
    """In the child: this command's folder, environment and streams, then `python -m metadist`."""
    import runpy

    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for src, dst in ((null, 0), (out, 1), (err, 2)):
            os.dup2(src, dst)
            os.close(src)
        sys.argv = ["metadist", *req["args"]]
    except BaseException:
        os._exit(120)
    try:
        runpy.run_module("metadist", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _leave(code)


def _exit_code(code) -> int:
    """What the interpreter makes of `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _leave(code: int) -> None:
    """The interpreter's exit up to its teardown of modules: non-daemon threads joined, atexit
    handlers run, stdout and stderr flushed. The teardown itself is skipped: it touches every
    object the zygote imported, which after a fork copies its whole heap (about 4 s here against
    0.2 s); objects still alive then are not promised their __del__ by Python either."""
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = code or 1
    os._exit(code)


# ------------------------------------------------------------------------------------ the client
class Zygote:
    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.zygote import serve; serve()"],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.lock = threading.Lock()
        self.buffer = b""
        self.forks = 0  # commands run as forks
        hello = self._read(120)
        self.usable = bool(hello and hello.get("ready") and hello.get("threads_started") == 0)

    def _read(self, timeout: float | None) -> dict | None:
        """The zygote's next line, None if it says nothing within `timeout` s (or has died)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def forkable(self, env: dict) -> bool:
        if not self.usable or self.proc.poll() is not None:
            return False
        keys = set(env) | set(self.env)
        return all(env.get(k) == self.env.get(k) for k in keys if not k.startswith(RUNTIME_ENV))

    def run(self, args: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "metadist", *args]
        with tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
            out, err = Path(tmp) / "out", Path(tmp) / "err"
            req = {"args": args, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            self.forks += 1
            pid = self._read(60)["pid"]
            done = self._read(timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self._read(None)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_bytes(), err.read_bytes())
            text = [p.read_text(errors="replace") for p in (out, err)]
            return subprocess.CompletedProcess(cmd, done["status"], *text)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_zygote: Zygote | None = None


def run(args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`python -m metadist *args`, as `subprocess.run(..., capture_output=True, text=True)` gives
    it: forked from the zygote where that is the same, else a fresh interpreter."""
    global _zygote
    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    cwd = cwd or ROOT
    if os.environ.get("METADIST_TEST_FRESH") != "1":
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = Zygote()
            atexit.register(_zygote.close)
        # one command at a time through the zygote: a second one at once runs beside it afresh
        if _zygote.forkable(env) and _zygote.lock.acquire(blocking=False):
            try:
                return _zygote.run(args, cwd, env, timeout)
            finally:
                _zygote.lock.release()
    return subprocess.run(
        [sys.executable, "-m", "metadist", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )
