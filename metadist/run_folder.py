"""The run folder <run.root>/<run.name>: taken by one launch at a time, with its config.yaml.

Lock: <run.root>/.<run.name>.lock, held (flock) by the main process while it trains and released
by the kernel when that process ends however it ends, so a lock left by a dead process is simply
taken over. A second launch on a busy folder names the process that holds it and exits 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from metadist import locks
from metadist.errors import MetadistError


class RunBusy(MetadistError):
    pass


class RunFolder:
    """run: the run section (root, name, fresh); config_yaml: the resolved config, written as
    config.yaml by the main process."""

    def __init__(self, run, config_yaml: str, is_main: bool):
        self.run, self.config_yaml, self.is_main = run, config_yaml, is_main
        self.dir = Path(run.root) / run.name
        self.lock_path = Path(run.root) / f".{run.name}.lock"
        self._lock = None
        self.notes: list[str] = []

    def open(self) -> None:
        """Main process: take the lock (or raise RunBusy), start over if run.fresh, write
        config.yaml."""
        if not self.is_main:
            return

        def busy(holder: str) -> RunBusy:
            return RunBusy(
                f"run folder {self.dir} is in use by {holder} (lock {self.lock_path}); "
                "wait for that launch to end or stop it, or choose another run.name"
            )

        self._lock = locks.take(self.lock_path, refuse=busy)  # held until close()
        old = self._lock.last.split()
        if old and old[0].startswith("pid=") and not locks.alive(int(old[0][4:])):
            self.notes.append(f"took over the lock of process {old[0][4:]}, which is gone")
        if self.run.fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(self.config_yaml)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
