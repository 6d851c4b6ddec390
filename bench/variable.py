"""`make bench-variable`: Meta-Dataset's variable episodes on this machine.

1. Memory per task at the largest episode (50 ways, 500 support and 500 query images, 84x84 RGB)
   for Conv4 (32 filters) and ResNet-12: the peak of the tensors one task's meta-step saves for
   backward (bench.bench.graph_bytes, each storage once), measured on episodes of the same
   shape (10 support and 10 query images a class) at 100, 200 and 400 images (ResNet-12: 60,
   100, 200) and fitted a + b * images (the
   residual says how linear it is), then extrapolated to 1,000 images; Conv4 also measured there
   directly. Second-order MAML (1 inner step, zero head; and with algo.checkpoint_inner),
   first-order, and ProtoNets.
2. Reading: a synthetic 84x84 RGB split of variable episodes (600 images a class, as
   mini-ImageNet's), written by the real writer into --work; the train stream (VariableBatches:
   the records, the gather from the mapped pool, the padding) in episodes/s with no worker, cold
   (the pool's pages dropped first, where allowed) and warm, against what a ProtoNets Conv4 step
   on the same batches consumes on this CPU.
3. The sampler (at prepare time): episodes/s of Meta-Dataset's sampler on ILSVRC-2012's train
   split sizes (712 classes, 732-1,300 images).

  python bench/variable.py [--only memory|reading|sampler] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import graph_bytes  # noqa: E402
from metadist import machine  # noqa: E402
from metadist.algorithms import maml  # noqa: E402
from metadist.algorithms.core import Inner  # noqa: E402
from metadist.data.store import drop_cached_pages  # noqa: E402
from metadist.data.synthetic import random_batch  # noqa: E402
from metadist.models.conv4 import ConvNet  # noqa: E402
from metadist.models.resnet12 import ResNet12  # noqa: E402
from metadist.step.compute import Eager, meta_backward  # noqa: E402

LARGEST = (50, 10, 10)  # ways, support and query images a class: 500 + 500


def episode(ways: int, shots: int, queries: int) -> dict:
    """One padded-format task (the masked path training runs on variable episodes)."""
    return dict(random_batch(1, ways, shots, queries, (3, 84, 84)), ways=torch.tensor([ways]))


VARIANTS = {
    "MAML 2nd order, 1 step": Inner(1, 0.01, False, head_init="zero"),
    "  + checkpoint_inner": Inner(1, 0.01, False, head_init="zero", checkpoint=True),
    "MAML 1st order, 1 step": Inner(1, 0.01, True, head_init="zero"),
    "ProtoNets": Inner(0, 0.01, False, head_init="proto"),
}


def meta_step(model, b, inner: Inner, chunk: int = 0) -> None:
    params = dict(model.named_parameters())
    second = inner.steps > 0 and not inner.first_order
    meta_backward(
        lambda f, p, c: maml.task_losses(f, p, c, inner), Eager(model, second, chunk), params, b
    )
    model.zero_grad(set_to_none=True)


def memory(only_conv4: bool = False) -> None:
    print(
        "\n1. memory per task at the largest episode (50 ways, 500 + 500 images of 84x84 RGB): "
        "measured at the sizes shown, fitted a + b*images, extrapolated to 1,000 images"
    )
    nets = {
        "conv4": (lambda: ConvNet(50, hidden=32, depth=4, in_channels=3, side=84), (5, 10, 20)),
        "resnet12": (
            lambda: ResNet12(50, (64, 160, 320, 640), in_channels=3, side=84),
            (3, 5, 10),
        ),
    }
    print(
        f"{'backbone':<9} {'variant':<24} {'measured (images: MB)':<40} {'MB/image':>8} "
        f"{'fit err':>7} {'GB at 1,000':>11} {'s/task at 1,000':>15}"
    )
    for name, (make, ways_list) in nets.items():
        if only_conv4 and name != "conv4":
            continue
        torch.manual_seed(0)
        model = make()
        meta_step(model, episode(5, 2, 2), VARIANTS["MAML 1st order, 1 step"])  # warm-up
        for label, inner in VARIANTS.items():
            sizes, mbs, secs = [], [], []
            for ways in ways_list:
                b = episode(ways, 10, 10)
                t = time.perf_counter()
                mbs.append(
                    graph_bytes(
                        lambda m=model, b=b, i=inner: meta_step(m, b, i), torch.device("cpu"), True
                    )
                )
                secs.append(time.perf_counter() - t)
                sizes.append(ways * 20)
            slope, icpt = np.polyfit(sizes, mbs, 1)
            fit_err = max(abs(icpt + slope * s - m) / m for s, m in zip(sizes, mbs))
            at = icpt + slope * 1000
            sec = np.polyfit(sizes, secs, 1)
            shown = ", ".join(f"{s}: {m / 1e6:,.0f}" for s, m in zip(sizes, mbs))
            print(
                f"{name:<9} {label:<24} {shown:<40} {slope / 1e6:>8.2f} {fit_err:>7.1%} "
                f"{at / 1e9:>11.1f} {sec[1] + sec[0] * 1000:>15.1f}",
                flush=True,
            )
            if name == "conv4":  # it fits here: the extrapolation checked at full size
                b = episode(*LARGEST)
                t = time.perf_counter()
                full = graph_bytes(
                    lambda m=model, b=b, i=inner: meta_step(m, b, i), torch.device("cpu"), True
                )
                print(
                    f"{'':<9} {'  measured at 1,000':<24} {'':<40} {'':>8} "
                    f"{abs(full - at) / full:>7.1%} {full / 1e9:>11.1f} "
                    f"{time.perf_counter() - t:>15.1f}",
                    flush=True,
                )


def synthetic_split(work: Path, classes: int = 64, per_class: int = 600) -> Path:
    """A train split of variable episodes over a synthetic 84x84 RGB pool (reused if there)."""
    from metadist import config
    from metadist.data.format import write_split
    from metadist.data.prepare import requested
    from metadist.data.sources import ClassSet

    root = work / f"variable-{classes}x{per_class}"
    if (root / "train" / "manifest.json").is_file():
        return root
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(per_class, 3, 84, 84), dtype=np.uint8)
    images = [np.roll(base, c, axis=-1) for c in range(classes)]
    cs = ClassSet(
        [f"c{c:05d}" for c in range(classes)],
        images,
        {"train": list(range(classes)), "val": [], "test": []},
        {"train": (0,), "val": (0,), "test": (0,)},
        {"source": "synthetic"},
    )
    d = config.load(
        None,
        [
            "data.source=folder",
            "data.name=synthetic-variable",
            f"data.shards={root}",
            "data.image_size=84",
            "data.channels=3",
            "data.episode=variable",
            "data.train_episodes=400",
            "data.episodes_per_shard=200",
        ],
    ).data
    spec = dict(requested(d, "train"), content_sha256=cs.digest("train"))
    write_split(root, "train", cs, spec, log=lambda *a: None)
    return root


def reading(work: Path) -> None:
    from metadist.data.order import StreamSpec, VariableBatches
    from metadist.data.split import EpisodeSource

    root = synthetic_split(work)
    print(
        "\n2. reading variable episodes (84x84 RGB, mapped pool of "
        f"{sum(f.stat().st_size for f in (root / 'train').glob('pool-*.tar')) / 1e9:.2f} GB, "
        "meta-batch 8, no worker)"
    )
    model = ConvNet(50, hidden=32, depth=4, in_channels=3, side=84)
    proto = VARIANTS["ProtoNets"]
    for label in ("cold", "warm"):
        dropped = drop_cached_pages(root) if label == "cold" else True
        src = EpisodeSource(root, "train", 0)
        stream = VariableBatches(src, StreamSpec(0, 8, 0, 1, 0, 25))
        t, images, batches = time.perf_counter(), 0, []
        for step in range(25):
            b = stream.batch_at(step)
            images += int((b["y_support"] >= 0).sum() + (b["y_query"] >= 0).sum())
            if step < 3:
                batches.append(b)
        dt = time.perf_counter() - t
        eps = 25 * 8 / dt
        note = "" if dropped else " (pages could not be dropped: warm)"
        print(f"  {label}{note}: {eps:,.1f} episodes/s, {images / dt:,.0f} images/s")
    t = time.perf_counter()
    for b in batches:
        meta_step(model, {k: v for k, v in b.items() if k != "step"}, proto, chunk=1)
    need = 8 * len(batches) / (time.perf_counter() - t)
    print(
        f"  a ProtoNets Conv4 step on these batches consumes {need:.2f} episodes/s on this CPU: "
        f"reading is {eps / need:,.0f}x that (warm)"
    )


def sampler() -> None:
    from metadist.config import VariableConfig
    from metadist.data.episodes import episode_rng, sample_variable_episode

    sizes = np.random.default_rng(0).integers(732, 1301, size=712).tolist()
    v = VariableConfig()
    t, n, rows = time.perf_counter(), 2000, 0
    for i in range(n):
        rows += len(sample_variable_episode(sizes, (0,), v, episode_rng(0, "train", i)))
    dt = time.perf_counter() - t
    print(
        f"\n3. the sampler (prepare), ILSVRC-2012 train sizes (712 classes): {n / dt:,.0f} "
        f"episodes/s, {rows / n:.0f} images an episode on average"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("memory", "conv4-memory", "reading", "sampler"))
    p.add_argument("--work", type=Path)
    args = p.parse_args()
    print(
        f"CPU: {machine.cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {time.strftime('%Y-%m-%d')}"
    )
    if args.only in (None, "sampler"):
        sampler()
    if args.only in (None, "reading"):
        with tempfile.TemporaryDirectory() as tmp:
            reading(args.work or Path(tmp))
    if args.only in (None, "memory", "conv4-memory"):
        memory(args.only == "conv4-memory")


if __name__ == "__main__":
    main()
