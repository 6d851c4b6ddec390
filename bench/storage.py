"""How to store 84x84 RGB episodes (make bench-storage): bytes per episode, total size for the
default counts, and decoded episodes/s on one core, for four ways to store them, against the
episodes/s a meta-step consumes.

  raw     each episode's pixels as one uint8 .npy (what format 1 stored for Omniglot)
  png     each episode's images as lossless PNGs
  source  each episode's images as the source files' own encoded bytes (JPEG), decoded and
          resized when read
  pool    format 2: every image once per class (uint8), each episode a record of which it uses

The data is synthetic (metadist.data.synthetic.write_folder_dataset: coloured shapes on noise,
sources about 400 px wide as JPEG q90, a sample of classes and images); PNG and JPEG sizes depend on
content, so those two columns are indicative. Totals are for mini-ImageNet's shape: 64 + 16 + 20
classes of 600 images, 20,000 + 320 + 640 episodes of 5-way 1-shot 15-query. Every reader hashes
what it reads (sha256), as metadist's does.

Then the format-2 pool as training reads it now, in place (data.pool=mmap): the real train
stream (meta-batch 4, 84x84 RGB 5-way 1-shot 15-query, converted to float batches) over a
synthetic pool of --pool-gb GB, with 0, 1 and 2 DataLoader workers, each cold (the pool's pages
dropped from the page cache with posix_fadvise(DONTNEED): every image read from disk) and warm.

  python bench/storage.py [--pool-gb 1] [--steps 100] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metadist import config, machine
from metadist.algorithms import model_of
from metadist.data.episodes import episode_rng, sample_episode
from metadist.data.sources import decode, folder, preprocess
from metadist.data.synthetic import random_batch
from metadist.distributed import OneProcess
from metadist.step import Plan, build

WAYS, SHOTS, QUERIES, SIZE = 5, 1, 15, 84
IMAGES, EPISODES = 38_400 + 9_600 + 12_000, 20_000 + 320 + 640


def rate(fn, items, seconds=3.0) -> float:
    """Items/s of fn over `items`, repeated for about `seconds`."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for it in items:
            fn(it)
            n += 1
    return n / (time.perf_counter() - t0)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(buf, format="PNG")
    return buf.getvalue()


def consumption(steps: int = 2) -> dict:
    """Episodes/s one process's meta-step consumes: Conv4 (32 filters) at 84x84 RGB, 5-way 1-shot
    15-query, meta-batch 4 (the MAML paper's mini-ImageNet recipe), 1 and 5 inner steps."""
    out = {}
    for inner in (1, 5):
        cfg = config.load(
            None,
            [
                "data.image_size=84",
                "data.channels=3",
                "data.queries=15",
                "model.hidden=32",
                f"algo.inner_steps={inner}",
                "algo.inner_lr=0.01",
                "train.meta_batch_size=4",
                "train.reduce=fast",
                "data.source=folder",
                "data.raw=.",
            ],
        )

        torch.manual_seed(0)
        model = model_of(cfg.model, cfg.algo, (3, 84, 84), 5)
        s = build(cfg, model, OneProcess(), Plan(0, "fast"), 4)
        b = random_batch(4, 5, 1, 15, (3, 84, 84))
        s(0, b, lambda: torch.zeros(3))
        t = time.perf_counter()
        for i in range(steps):
            s(i + 1, b, lambda: torch.zeros(3))
        out[inner] = 4 * steps / (time.perf_counter() - t)
    return out


def in_place(work: Path, gb: float, steps: int) -> list[dict]:
    """Episodes/s of the real train stream over a `gb` GB pool read in place, cold and warm, for
    0, 1 and 2 DataLoader workers."""
    from bench.pool_memory import make_pool
    from metadist.data.device import meta_batches
    from metadist.data.order import StreamSpec
    from metadist.data.split import EpisodeSource
    from metadist.data.store import Access, drop_cached_pages

    root = make_pool(work, gb)
    access = Access(cache_dir=str(work / "cache"))
    _ = EpisodeSource(root, "train", access=access).pool  # checked once (stamped): not timed
    rows = []
    for workers in (0, 1, 2):
        for state in ("cold", "warm"):
            if state == "cold":
                drop_cached_pages(root)
            source = EpisodeSource(root, "train", seed=0, access=access)
            t, n = time.perf_counter(), 0
            for b in meta_batches(source, StreamSpec(0, 4, 0, 1, 0, steps, num_workers=workers)):
                n += b["x_support"].shape[0]
            rows.append(
                {
                    "workers": workers,
                    "state": state,
                    "episodes_per_s": n / (time.perf_counter() - t),
                }
            )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--episodes", type=int, default=24)
    p.add_argument("--pool-gb", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--work", default="")
    args = p.parse_args()
    threads = torch.get_num_threads()
    print(
        f"CPU: {machine.cpu_model()}, torch {torch.__version__}; decoding on 1 core, the meta-step "
        f"on {threads}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        from metadist.data.synthetic import FolderSpec, write_folder_dataset

        write_folder_dataset(
            root,
            "fractions",
            FolderSpec(classes=args.classes, images=args.images, size=400, channels=3, fmt="jpg"),
        )
        d = config.load(
            None,
            [
                "data.source=folder",
                f"data.raw={root}",
                "data.channels=3",
                f"data.image_size={SIZE}",
            ],
        ).data
        cs = folder.load(d, SHOTS + QUERIES, log=lambda *a: None, workers=1)
        files = {c: sorted((root / name).iterdir()) for c, name in enumerate(cs.names)}
        sizes = [len(x) for x in cs.images]
        records = [
            sample_episode(sizes, (0,), WAYS, SHOTS, QUERIES, episode_rng(0, "train", i))
            for i in range(args.episodes)
        ]
        pool = np.concatenate(cs.images)
        offsets = np.concatenate([[0], np.cumsum(sizes)])

        def pixels(rec):
            return pool[offsets[rec[:, 0]] + rec[:, 1]]

        raw = [npy(pixels(r)) for r in records]
        pngs = [[png(img) for img in pixels(r)] for r in records]
        srcs = [[files[c][m].read_bytes() for c, m, _ in r] for r in records]
        recs = [npy(r) for r in records]
        torch.set_num_threads(1)

        def read_raw(b):
            hashlib.sha256(b).digest()
            return np.load(io.BytesIO(b), allow_pickle=False)

        def read_png(bs):
            return np.stack(
                [
                    np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                    for b in bs
                    if hashlib.sha256(b).digest()
                ]
            )

        def read_source(bs):
            return [
                preprocess(decode("source", 3, b).unsqueeze(0), SIZE)
                for b in bs
                if hashlib.sha256(b).digest()
            ]

        def read_pool(b):
            hashlib.sha256(b).digest()
            return pixels(np.load(io.BytesIO(b), allow_pickle=False))

        pool_per_image = pool.nbytes / len(pool)
        per_episode = {
            "raw": np.mean([len(b) for b in raw]),
            "png": np.mean([sum(map(len, bs)) for bs in pngs]),
            "source": np.mean([sum(map(len, bs)) for bs in srcs]),
            "pool": np.mean([len(b) for b in recs]),
        }
        totals = {
            "raw": EPISODES * per_episode["raw"],
            "png": EPISODES * per_episode["png"],
            "source": EPISODES * per_episode["source"],
            # + a tar header per record
            "pool": IMAGES * pool_per_image + EPISODES * (per_episode["pool"] + 1024),
        }
        speed = {
            "raw": rate(read_raw, raw),
            "png": rate(read_png, pngs),
            "source": rate(read_source, srcs, 5.0),
            "pool": rate(read_pool, recs),
        }
        torch.set_num_threads(threads)
    need = consumption()
    print(
        f"\n84x84 RGB, {WAYS}-way {SHOTS}-shot {QUERIES}-query episodes "
        f"({WAYS * (SHOTS + QUERIES)} images each):"
    )
    print(
        f"{'storage':<8} {'bytes/episode':>14} {'total, default counts':>22} "
        f"{'episodes/s, 1 core':>19}"
    )
    for k in per_episode:
        extra = (
            f"  (a {per_episode[k] / 1e3:.1f} KB record + a tar header; the {IMAGES:,} images "
            "once: "
            f"{IMAGES * pool_per_image / 1e9:.2f} GB, "
            f"{IMAGES * pool_per_image / EPISODES / 1e3:.0f} KB per episode)"
            if k == "pool"
            else ""
        )
        shown = totals[k] / EPISODES
        print(
            f"{k:<8} {shown / 1e3:>11.1f} KB {totals[k] / 1e9:>19.2f} GB {speed[k]:>19.1f}{extra}"
        )
    print(
        f"\nthe meta-step consumes (Conv4 32 filters, meta-batch 4, second order, {threads} "
        "threads): "
        + ", ".join(f"{v:.2f} episodes/s with {k} inner step(s)" for k, v in need.items())
    )
    for k in speed:
        print(f"  {k:<8} reader / fastest meta-step: {speed[k] / max(need.values()):8.1f}x")
    work = Path(args.work or tempfile.mkdtemp(prefix="storage-"))
    print(
        f"\nthe pool read in place (data.pool=mmap), {args.pool_gb:g} GB, the train stream at "
        f"meta-batch 4 ({args.steps} steps):"
    )
    print(f"{'workers':>7} {'page cache':>10} {'episodes/s':>11} {'/ fastest meta-step':>20}")
    for r in in_place(work, args.pool_gb, args.steps):
        print(
            f"{r['workers']:>7} {r['state']:>10} {r['episodes_per_s']:>11.1f} "
            f"{r['episodes_per_s'] / max(need.values()):>19.1f}x",
            flush=True,
        )
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
