"""Memory and speed per backbone (make bench-backbones): Conv4 (32 filters), ResNet-12
(64-160-320-640), torchvision's ResNet-18 and timm's ViT-S/16 (`model.backbone=torchvision:resnet18`
and `timm:vit_small_patch16_224`) at 84x84 RGB, 5-way 1-shot 15-query: ProtoNets, first and second
order, 1 and 5 inner steps, with and without algo.checkpoint_inner (`--short`: ProtoNets and one
inner step of either order): the memory one task's meta-step holds (the peak of the tensors saved
for backward, each storage counted once, recomputation included) and tasks/s on this CPU (one
process); and from them a projection, stated as one: the largest meta-batch one 80 GB GPU holds in
one graph, and how many GPUs a meta-batch of 32 needs without chunking (algo.tasks_per_chunk bounds
the graph to that many tasks at a time, trading parallelism for memory).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench import graph_bytes
from metadist import machine
from metadist.algorithms import maml
from metadist.algorithms.core import Inner
from metadist.data.synthetic import random_batch
from metadist.models import InnerRates, library
from metadist.models.conv4 import ConvNet
from metadist.models.resnet12 import ResNet12
from metadist.step.compute import Eager, meta_backward

# an 80 GB card, 10% kept for weights, optimizer, workspace and fragmentation
GPU_BYTES = 80e9 * 0.9


def batch(tasks: int):
    return random_batch(tasks, 5, 1, 15, (3, 84, 84))


PROTO = Inner(0, 0.01, True, head_init="proto", ways=5)  # ProtoNets: no inner loop


def run(model, b, inner: Inner, chunk: int = 0) -> None:
    params = dict(model.named_parameters())
    meta_backward(
        lambda f, p, c: maml.task_losses(f, p, c, inner),
        Eager(model, inner.steps > 0 and not inner.first_order, chunk),
        params,
        b,
        1.0 / b["x_support"].shape[0],
    )
    model.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("conv4", "resnet12", "resnet18", "vit_small"))
    p.add_argument("--short", action="store_true", help="ProtoNets and 1 inner step only")
    p.add_argument(
        "--device", default="cpu", help="cuda: the GPU's peak allocation and tasks/s (synchronised)"
    )
    args = p.parse_args()
    cfg = argparse.Namespace(dropblock=0.0)
    print(
        f"CPU: {machine.cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} "
        "threads; "
        "84x84 RGB, 5-way 1-shot 15-query (80 images a task)"
    )
    nets = {
        "conv4": lambda: ConvNet(5, hidden=32, depth=4, in_channels=3, side=84),
        "resnet12": lambda: ResNet12(5, (64, 160, 320, 640), in_channels=3, side=84),
        # second order runs timm's attention on its unfused path (the fused one has no second
        # derivative); every row of a network runs the model built for second order
        "resnet18": lambda: library.build(
            "torchvision:resnet18", 5, (3, 84, 84), cfg, InnerRates(), True
        ),
        "vit_small": lambda: library.build(
            "timm:vit_small_patch16_224", 5, (3, 84, 84), cfg, InnerRates(), True
        ),
    }
    print(
        f"\n{'backbone':<9} {'order':>5} {'steps':>5} {'variant':<17} {'MB/task':>8} "
        f"{'tasks/s':>8} {'s/task':>7} "
        f"{'per 80 GB':>9} {'GPUs for 32':>11}"
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)} (MB per task: the allocator's peak)")
    one = {k: v.to(device) for k, v in batch(1).items()}
    for name, make in nets.items():
        if args.only and name != args.only:
            continue
        torch.manual_seed(0)
        model = make().to(device)
        run(model, one, Inner(1, 0.01, True))  # warm-up: allocator, kernels
        rows = [("proto", 0, False)] + [
            (order, steps, ckpt)
            for order in (2, 1)
            for steps in ((1,) if args.short else (1, 5))
            # first order holds no inner-loop graph: recomputing its activations changes nothing
            for ckpt in ((False, True) if order == 2 and not args.short else (False,))
        ]
        for order, steps, ckpt in rows:
            inner = PROTO if order == "proto" else Inner(steps, 0.01, order == 1, checkpoint=ckpt)
            # one run gives both: the hooks cost microseconds a tensor
            t = time.perf_counter()
            mb = graph_bytes(lambda m=model, i=inner: run(m, one, i), device, dedup=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tps = 1 / (time.perf_counter() - t)
            per_gpu = int(GPU_BYTES // mb)
            gpus = math.ceil(32 / per_gpu) if per_gpu else float("inf")
            variant = "checkpoint_inner" if ckpt else "one graph"
            print(
                f"{name:<9} {order:>5} {steps:>5} {variant:<17} {mb / 1e6:>8.0f} "
                f"{tps:>8.3f} {1 / tps:>7.2f} {per_gpu:>9} {gpus:>11}",
                flush=True,
            )
        # chunking: the same per-task bytes, the peak bounded to a chunk, the time on a CPU
        if name == "conv4" and not args.short:
            b = {k: v.to(device) for k, v in batch(4).items()}
            for chunk in (0, 1):
                inner = Inner(5, 0.01, False)
                t = time.perf_counter()
                run(model, b, inner, chunk)
                print(
                    f"  conv4, second order, 5 steps, meta-batch 4, tasks_per_chunk={chunk}: "
                    f"{4 / (time.perf_counter() - t):.3f} tasks/s, graph of "
                    f"{4 if chunk == 0 else 1} task(s) at a time"
                )


if __name__ == "__main__":
    main()
