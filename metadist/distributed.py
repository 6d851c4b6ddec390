"""Process setup and the collective operations: the only module that imports accelerate.

`Dist(timeout_s)` starts one process's share of an `accelerate launch` (or a plain single
process): CUDA when available, else CPU with gloo. A launch that asked for several processes but
got no process group is an error, never several silent single-process runs. The meta-gradient is
summed across ranks explicitly, once per step (the meta-learner is never wrapped in DDP, which
does not support second-order gradients through autograd.grad), with each rank's stop votes (a
signal, the wall-clock bound, a changed shard) riding the same collective, so ranks agree on
where to stop without one of their own. The collectives here are plain (`all_reduce`,
`all_to_all`, `all_gather`, with a timeout and one-line errors); how the meta-gradient is summed
with them (exact mode's tree over fixed groups, fast mode's all-reduce) is
metadist/step/reduce.py's. `OneProcess` stands in for a Dist where one process computes alone
(benchmarks, tests); `free_port` and `accelerate_launch` start launches on this machine.

Launchers: `accelerate launch`, torchrun (also elastic: its TORCHELASTIC_* variables are read
for the log) or a plain process; `threads` > 0 pins the intra-op threads of every process (on a
CPU the float32 rounding of a chunk's kernels depends on it).

Faults: every collective times out after `train.collective_timeout_s` (a rank that stops
answering fails the launch instead of hanging it), and a worker whose launcher dies gets SIGTERM
(PR_SET_PDEATHSIG), so it checkpoints and exits instead of training on as an orphan.

Exit: a process that ran gloo collectives ends through `leave()` (see there): Python's own
interpreter shutdown can abort it after a successful run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as tdist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from metadist.errors import MetadistError

_PR_SET_PDEATHSIG = 1


class DistError(MetadistError):
    pass


def die_with_launcher() -> None:
    """In a launched worker: SIGTERM when the launcher (our parent) dies, however it dies."""
    if "LOCAL_RANK" not in os.environ or not os.path.exists("/proc/self"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_collectives_ran = False


def leave(code: int) -> None:
    """End this process with `code`; after collectives, without Python's interpreter shutdown.

    A gloo worker thread drops its reference to a finished collective's tensors after the
    waiting thread has moved on, and that release takes the GIL. If the process is already
    shutting the interpreter down by then, the thread is ended inside a C++ destructor and the
    process aborts ("terminate called without an active exception", SIGABRT): 3 times in about
    140 two-process launches here, each after a run that had written everything (core dump:
    ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> decref -> take_gil -> pthread_exit; the
    upstream fix, pytorch#179291, was abandoned; here the group outlived destroy_process_group,
    with no Python object holding it, so its threads were not joined). So a process that ran
    collectives waits for its threads, runs its exit handlers (trackers, logging), flushes its
    streams and exits at once (0 aborts in 60 launches after); one that did not
    exits normally."""
    if not _collectives_ran:
        sys.exit(code)
    # Python's own shutdown order, less the part that aborts: non-daemon threads, exit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def collectives_ran() -> bool:
    return _collectives_ran


def elastic_info() -> dict | None:
    """What torch elastic (torchrun) tells its workers: the restart count and limit, the run id."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return {
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "max_restarts": int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")),
        "run_id": os.environ["TORCHELASTIC_RUN_ID"],
        "nodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
    }


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (a rendezvous of processes launched on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch() -> list[str]:
    """`accelerate launch` of this Python's accelerate, started through its module: the
    `accelerate` command imports every subcommand before it runs one, and its `estimate` imports
    timm where timm is installed (4.5 s of CPU a launch on a 2-core AMD Zen 3, twice what the
    launcher needs otherwise)."""
    return [sys.executable, "-m", "accelerate.commands.launch"]


class OneProcess:
    """What the step needs of a `Dist`, for rank `rank` of `world` with no collectives: a
    benchmark or a test in one process (a test of several ranks merges their sums itself)."""

    def __init__(self, rank: int = 0, world: int = 1, device="cpu"):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.reduce_seconds = 0.0


class Dist:
    def __init__(self, timeout_s: float = 600.0, threads: int = 0):
        requested = int(os.environ.get("WORLD_SIZE", "1"))
        die_with_launcher()
        if threads > 0:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.elastic = elastic_info()
        # METADIST_CPU=1/0 forces the choice; the default uses CUDA when there is one. (=0 on a
        # CPU-only machine reproduces the classic mistake, which the check below turns into
        # an error.)
        choice = os.environ.get("METADIST_CPU", "auto")
        cpu = {"1": True, "0": False}.get(choice, not torch.cuda.is_available())
        self.timeout_s = timeout_s
        self.acc = Accelerator(
            cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]
        )
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        self.device = self.acc.device
        if requested > 1 and (self.world != requested or not tdist.is_initialized()):
            self.acc.end_training()
            raise DistError(
                f"launched for {requested} processes but this one runs alone (world size "
                f"{self.world}); "
                "no process group was formed, so the ranks would train unsynchronised"
            )
        if tdist.is_initialized():
            global _collectives_ran
            _collectives_ran = True  # forming the group ran collectives already
        self.reduce_seconds = 0.0
        self._buffers: dict = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> None:
        # only initialisation draws from global RNGs; data and tasks use named generators
        set_seed(seed)

    def _collective(self, what: str, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:  # gloo/NCCL: a peer closed its connection or timed out
            raise DistError(
                f"rank {self.rank}: {what} failed ({str(e).splitlines()[0][:160]}): another rank "
                "died or "
                f"stopped answering for train.collective_timeout_s={self.timeout_s:g}; "
                "launch again to resume from the last checkpoint"
            ) from None

    def all_reduce(self, flat: torch.Tensor, what: str) -> None:
        """Sum `flat` over ranks, in place."""
        self._collective(what, tdist.all_reduce, flat, tdist.ReduceOp.SUM)

    def all_to_all(self, recv: torch.Tensor, send: torch.Tensor, what: str) -> None:
        """Slice j of every rank's `send` to rank j's `recv` (equal slices)."""
        self._collective(what, tdist.all_to_all_single, recv, send)

    def all_gather(self, out: torch.Tensor, part: torch.Tensor, what: str) -> None:
        """Every rank's `part`, in rank order, into `out`."""
        self._collective(what, tdist.all_gather_single, out, part)

    def buffer(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A buffer kept across steps (a fresh 50 MB allocation every step costs page faults on a
        CPU)."""
        key = (name, shape, like.dtype, like.device)
        if key not in self._buffers:
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] != name}
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor of metrics over ranks."""
        if self.world == 1:
            return values
        values = values.clone()
        self._collective("a metrics all-reduce", tdist.all_reduce, values, tdist.ReduceOp.SUM)
        return values

    def gather_rows(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Rows held round-robin (rank r has global rows r, r+W, ...) -> all `total` rows in
        order."""
        if self.world == 1:
            return x
        per = -(-total // self.world)
        padded = torch.zeros((per,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in range(self.world)]
        self._collective("an all-gather of evaluation results", tdist.all_gather, out, padded)
        return torch.stack(out, 1).reshape((per * self.world,) + tuple(x.shape[1:]))[:total]

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self._collective("an all-gather", tdist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        self._collective("a broadcast", tdist.broadcast_object_list, box, 0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self._collective("a barrier", self.acc.wait_for_everyone)

    def close(self) -> None:
        self.acc.end_training()
