"""The run folder <run.root>/<run.name>: taken by one launch at a time, its config.yaml, its
metrics log, and where a relaunch resumes.

Lock: <run.root>/.<run.name>.lock, held (flock) by the main process while it trains and released
by the kernel when that process ends however it ends, so a lock left by a dead process is simply
taken over. A second launch on a busy folder names the process that holds it and exits 2.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from metadist import config as config_mod
from metadist.errors import MetadistError


class RunBusy(MetadistError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class RunFolder:
    def __init__(self, cfg: config_mod.Config, is_main: bool):
        self.cfg, self.is_main = cfg, is_main
        self.dir = Path(cfg.run.root) / cfg.run.name
        self.lock_path = Path(cfg.run.root) / f".{cfg.run.name}.lock"
        self._lock = None
        self.notes: list[str] = []

    def open(self) -> None:
        """Main process: take the lock (or raise RunBusy), start over if run.fresh, write config.yaml."""
        if not self.is_main:
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunBusy(f"run folder {self.dir} is in use by {holder} (lock {self.lock_path}); "
                          "wait for that launch to end or stop it, or choose another run.name") from None
        f.seek(0)
        old = f.read().split()
        if old and old[0].startswith("pid=") and not _alive(int(old[0][4:])):
            self.notes.append(f"took over the lock of process {old[0][4:]}, which is gone")
        f.seek(0)
        f.truncate()
        f.write(f"pid={os.getpid()} host={socket.gethostname()}\n")
        f.flush()
        self._lock = f
        if self.cfg.run.fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(config_mod.to_yaml(self.cfg))

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()         # releases the flock
            self._lock = None

    def metrics_log(self, resumed_step: int | None):
        """The metrics file, opened for appending (main process; else None). On resume, records
        past the checkpoint's step are dropped; a run that never checkpointed starts it anew."""
        if not self.is_main:
            return None
        path = self.dir / "metrics.jsonl"
        if path.exists():
            if resumed_step is None:
                path.unlink()
            else:
                kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resumed_step]
                path.write_text("".join(ln + "\n" for ln in kept))
        return open(path, "a")
