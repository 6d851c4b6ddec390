"""Process setup and the collective operations: the only module that imports accelerate.

`Dist()` starts one process's share of an `accelerate launch` (or a plain single process): CUDA
when available, else CPU with gloo. A launch that asked for several processes but got no process
group is an error, never several silent single-process runs. Meta-gradients are averaged across
ranks explicitly, once per step, as one flattened buffer (the meta-learner is never wrapped in
DDP, which does not support second-order gradients through autograd.grad).
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as tdist
from accelerate import Accelerator
from accelerate.utils import set_seed


class DistError(RuntimeError):
    pass


class Dist:
    def __init__(self):
        requested = int(os.environ.get("WORLD_SIZE", "1"))
        # METADIST_CPU=1/0 forces the choice; the default uses CUDA when there is one. (=0 on a
        # CPU-only machine reproduces the classic mistake, which the check below turns into an error.)
        choice = os.environ.get("METADIST_CPU", "auto")
        cpu = {"1": True, "0": False}.get(choice, not torch.cuda.is_available())
        self.acc = Accelerator(cpu=cpu)
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        self.device = self.acc.device
        if requested > 1 and (self.world != requested or not tdist.is_initialized()):
            self.acc.end_training()
            raise DistError(f"launched for {requested} processes but this one runs alone (world size {self.world}); "
                            "no process group was formed, so the ranks would train unsynchronised")
        self.reduce_seconds = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> None:
        set_seed(seed)   # only initialisation draws from global RNGs; data and tasks use named generators

    def mean_gradients(self, params: list[torch.Tensor]) -> None:
        """Average .grad of `params` over ranks in one all-reduce of a flat buffer."""
        if self.world == 1:
            return
        t = time.perf_counter()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        flat /= self.world
        for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
            p.grad = g.view_as(p)     # views of the reduced buffer: no copy back
        self.reduce_seconds += time.perf_counter() - t

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor of metrics over ranks."""
        if self.world == 1:
            return values
        values = values.clone()
        tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
        return values

    def gather_rows(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Rows held round-robin (rank r has global rows r, r+W, ...) -> all `total` rows in order."""
        if self.world == 1:
            return x
        per = -(-total // self.world)
        padded = torch.zeros((per,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in range(self.world)]
        tdist.all_gather(out, padded)
        return torch.stack(out, 1).reshape((per * self.world,) + tuple(x.shape[1:]))[:total]

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    def close(self) -> None:
        self.acc.end_training()
