"""Preemption: SIGTERM (Kubernetes, SLURM, torch's launcher forwarding its own) and SIGUSR1
(`sbatch --signal=USR1@90`) ask the run to stop. The handler only raises a flag: every rank
finishes its current step, the ranks agree on the step to stop at (the flag rides the reduction
of the meta-gradient, metadist/step/reduce.py), a checkpoint is written at that step, and the
process exits with status 75 (`metadist.errors.Preempted`). Launching again resumes there,
bit-identically.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
