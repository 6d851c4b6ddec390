"""The one node lock: an exclusive flock on a file, held by one process of the node at a time and
released by the kernel however its holder ends (a lock cannot outlive its process). The file names
its holder (pid and host), so whoever waits, or is refused, can say who has it. Used for a run
folder (refused while another launch trains in it), a shards folder being prepared, a file checked
or fetched once per node, and the per-machine cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a lock's last holder, a search's worker)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _holder(f) -> str:
    f.seek(0)
    return f.read().strip() or "another process"


class Held:
    """A taken lock: `last` names who held it before (to tell what a process that died left
    behind); `release()` (or closing the process) lets the next one in."""

    def __init__(self, f, last: str):
        self.file, self.last = f, last

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def take(path: Path, what: str = "", timeout_s=math.inf, say=None, refuse=None) -> Held:
    """The lock on `path`. Held by another process: `refuse(holder)` is raised at once where given;
    else say `what` waits on the holder and wait up to `timeout_s`, then raise `TimeoutError`
    naming the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 (held with its flock until released)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(f)
        if refuse is not None:
            f.close()
            raise refuse(holder) from None
        if say is not None:
            say(f"{what}: {holder} is doing it; waiting")
        deadline = time.monotonic() + timeout_s
        while True:
            time.sleep(0.05)
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            if time.monotonic() > deadline:
                f.close()
                raise TimeoutError(holder) from None
    last = _holder(f)
    f.seek(0)
    f.truncate()
    f.write(f"pid={os.getpid()} host={socket.gethostname()}\n")
    f.flush()
    return Held(f, last)


@contextlib.contextmanager
def node_lock(path: Path, what: str = "", timeout_s=math.inf, say=None):
    """`take` for the length of a with-block; yields who held the lock before."""
    held = take(path, what, timeout_s, say)
    try:
        yield held.last
    finally:
        held.release()
