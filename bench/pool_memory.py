"""`make bench-pool`: what a node holds of a split's image pool, measured in real ranks.

1. One copy per node: W ranks (accelerate launch, W = 1, 2, 4) each read every image of the same
   split; each reports the proportional set size (PSS, /proc/self/smaps) of its mappings of the
   pool files and its private (anonymous) memory. With data.pool=mmap the ranks' PSS adds up to
   the pool's bytes (the page cache's one copy, shared); with data.pool=memory each rank holds a
   private copy, so the private memory adds up to W copies.
2. Bigger than memory: one process streams the train split of pools of 0.5, 1, 2 and 4 GB; its
   private memory stays flat with mmap (the pages are the page cache's). With --limit-gb and a
   writable memory cgroup (v1 or v2), the process runs under that memory limit, smaller than the
   pool: mmap still reads every image (the kernel drops and re-reads pages); memory cannot.

Pools are format-identical synthetic splits (84x84 RGB, 600 images a class, as mini-ImageNet's),
written by the real writer into --work (default: a temporary folder) and never committed.

  python bench/pool_memory.py [--ranks 1,2,4] [--sizes 0.5,1,2,4] [--limit-gb 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE = (3, 84, 84)
PER_CLASS = 600


def pool_overrides(root: Path, gigabytes: float, episodes: int = 2000) -> list[str]:
    """The data.* settings of the synthetic dataset make_pool writes at `root` (what `metadist
    train` needs to use its shards as they are)."""
    return [
        "data.source=folder",
        "data.name=synthetic-pool",
        f"data.shards={root}",
        "data.image_size=84",
        "data.channels=3",
        "data.queries=15",
        f"data.train_episodes={episodes}",
        "data.val_episodes=32",
        "data.test_episodes=32",
        f"data.episodes_per_shard={min(episodes, 1000)}",
    ]


def make_pool(folder: Path, gigabytes: float, episodes: int = 2000) -> Path:
    """A synthetic dataset whose train pool is about `gigabytes`, with small val and test splits,
    written by metadist's own writer with the manifests a `metadist train` with
    pool_overrides() expects (reused when already there); returns the shards root."""
    from metadist import config
    from metadist.data.format import write_split
    from metadist.data.prepare import requested
    from metadist.data.sources import ClassSet

    root = Path(folder) / f"pool-{gigabytes:g}gb"
    if all((root / s / "manifest.json").is_file() for s in ("train", "val", "test")):
        return root
    per_class = PER_CLASS * int(np.prod(IMAGE))
    n_train = max(5, round(gigabytes * 1e9 / per_class))
    pattern = (np.arange(per_class, dtype=np.uint32) % 251).astype(np.uint8)
    pattern = pattern.reshape(PER_CLASS, *IMAGE)
    classes = n_train + 10
    images = [np.roll(pattern, c) for c in range(classes)]  # distinct content per class, cheap
    splits = {
        "train": list(range(n_train)),
        "val": list(range(n_train, n_train + 5)),
        "test": list(range(n_train + 5, classes)),
    }
    cs = ClassSet(
        [f"c{c:05d}" for c in range(classes)],
        images,
        splits,
        dict.fromkeys(splits, (0,)),
        {"source": "synthetic"},
    )
    d = config.load(None, pool_overrides(root, gigabytes, episodes)).data
    for split in ("train", "val", "test"):
        spec = dict(requested(d, split), content_sha256=cs.digest(split))
        write_split(root, split, cs, spec, log=lambda *a: None)
    return root


def smaps(files: set[str]) -> dict:
    """This process's PSS of its mappings of `files`, and its anonymous (private) memory, bytes."""
    pss = anon = 0
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
            current = parts[5] if len(parts) > 5 else ""
        elif parts[:1] == ["Pss:"] and current in files:
            pss += int(parts[1]) * 1024
        elif parts[:1] == ["Anonymous:"]:
            anon += int(parts[1]) * 1024
    return {"pool_pss": pss, "anonymous": anon}


def touch_all(source, chunk: int = 2048) -> int:
    """Read every image of the split once (gathered in chunks, then dropped)."""
    n = len(source.pool)
    total = 0
    for start in range(0, n, chunk):
        total += int(source.pool[np.arange(start, min(n, start + chunk))][:, 0, 0, 0].sum())
    return total


def rank_main(root: str, mode: str, out: str) -> None:
    """In a launched rank: read every image, then report what the pool costs it (rank 0 writes
    every rank's): its share of the mapped pool pages (PSS) and the private memory reading the
    pool added (a decoded copy with data.pool=memory)."""
    import torch.distributed as tdist

    from metadist.data.split import EpisodeSource
    from metadist.data.store import Access
    from metadist.distributed import Dist, leave

    dist = Dist(120.0, threads=1)
    source = EpisodeSource(root, "train", access=Access(pool=mode))
    files = {str(Path(root) / "train" / e["name"]) for e in source.manifest["pool"]}
    before = smaps(files)["anonymous"]
    touch_all(source)
    dist.barrier()  # every rank holds its maps while every rank measures
    after = smaps(files)
    mine = {"pool_pss": after["pool_pss"], "anonymous": after["anonymous"] - before}
    every = [mine]
    if dist.world > 1:
        every = [None] * dist.world
        tdist.all_gather_object(every, mine)
    if dist.is_main:
        rec = {"ranks": every, "pool_bytes": source.manifest["pool_bytes"]}
        Path(out).write_text(json.dumps(rec))
    dist.barrier()
    dist.close()
    leave(0)


def ranks_share(root: Path, ranks: int, mode: str, work: Path) -> dict:
    """Launch `ranks` processes on `root`'s train split; their measurements, summed."""
    out = work / f"ranks-{ranks}-{mode}.json"
    cmd = [sys.executable, __file__, "--rank-main", str(root), mode, str(out)]
    if ranks > 1:
        from metadist.distributed import accelerate_launch, free_port

        launch = [
            *accelerate_launch(),
            "--multi_gpu",
            "--num_processes",
            str(ranks),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ]
        cmd = launch + cmd[1:]
    env = dict(os.environ, METADIST_CPU="1", METADIST_CACHE_DIR=str(work / "cache"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{ranks} ranks ({mode}) failed:\n{r.stderr[-3000:]}")
    rec = json.loads(out.read_text())
    pss = sum(x["pool_pss"] for x in rec["ranks"])
    anon = sum(x["anonymous"] for x in rec["ranks"])
    size = rec["pool_bytes"]
    return {
        "ranks": ranks,
        "mode": mode,
        "pool_bytes": size,
        "pss_sum": pss,
        "pss_ratio": pss / size,
        "anonymous_sum": anon,
        "anonymous_ratio": anon / size,
    }


def stream_main(root: str, mode: str, out: str) -> None:
    """In one process: read every image of the split, then report its memory."""
    from metadist.data.split import EpisodeSource
    from metadist.data.store import Access

    source = EpisodeSource(root, "train", access=Access(pool=mode))
    files = {str(Path(root) / "train" / e["name"]) for e in source.manifest["pool"]}
    before, t = smaps(files)["anonymous"], time.perf_counter()
    touch_all(source)
    after = smaps(files)
    rec = {
        "anonymous": after["anonymous"] - before,
        "total_anonymous": after["anonymous"],
        "pool_pss": after["pool_pss"],
        "seconds": time.perf_counter() - t,
        "pool_bytes": source.manifest["pool_bytes"],
    }
    Path(out).write_text(json.dumps(rec))


def cgroup(limit_gb: float) -> Path | None:
    """A memory cgroup (v1) limited to `limit_gb`, or None where none can be made."""
    group = Path("/sys/fs/cgroup/memory") / f"metadist-bench-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 1e9)))
    except OSError:
        return None
    return group


def streamed(root: Path, mode: str, work: Path, limit_gb: float = 0.0) -> dict:
    """One process reading every image of `root`'s train split (under a memory limit if given)."""
    out = work / f"stream-{root.name}-{mode}-{limit_gb:g}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--stream-main", str(root), mode, str(out)]
    group = cgroup(limit_gb) if limit_gb else None
    if limit_gb and group is None:
        return {"mode": mode, "error": "no writable memory cgroup on this machine"}
    if limit_gb:  # the pages cached (and charged elsewhere) while the pool was written: read anew
        from metadist.data.store import drop_cached_pages

        drop_cached_pages(root)
    if group is not None:
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    env = dict(os.environ, METADIST_CACHE_DIR=str(work / "cache"))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    finally:
        if group is not None:
            time.sleep(0.2)
            group.rmdir()
    if r.returncode:
        why = (
            "killed by the kernel's out-of-memory killer"
            if r.returncode in (-9, 137)
            else (r.stderr.strip().splitlines() or ["failed"])[-1][:200]
        )
        return {"mode": mode, "limit_gb": limit_gb, "exit": r.returncode, "error": why}
    return dict(json.loads(out.read_text()), mode=mode, limit_gb=limit_gb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--ranks-gb", type=float, default=0.5, help="pool size for the ranks' part")
    p.add_argument("--sizes", default="0.5,1,2,4")
    p.add_argument("--limit-gb", type=float, default=1.0)
    p.add_argument("--work", default="")
    p.add_argument("--parts", default="1,2,3")
    args = p.parse_args()
    from metadist.machine import cpu_model

    work = Path(args.work or tempfile.mkdtemp(prefix="pool-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; pools in {work}"
    )
    parts = {int(x) for x in args.parts.split(",")}
    if 1 in parts:
        ranks_part(work, args)
    if 2 in parts:
        sizes_part(work, args)
    if 3 in parts and args.limit_gb:
        limit_part(work, args)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def ranks_part(work: Path, args) -> None:
    root = make_pool(work, args.ranks_gb)
    print(f"\n1. ranks reading every image of one {args.ranks_gb:g} GB pool")
    print(
        f"{'ranks':>5} {'pool':>6} {'sum of PSS of the pool files':>29} "
        f"{'sum of private memory the pool added':>37}"
    )
    for mode in ("mmap", "memory"):
        for n in [int(x) for x in args.ranks.split(",")]:
            r = ranks_share(root, n, mode, work)
            print(
                f"{n:>5} {mode:>6} {r['pss_sum'] / 1e9:>12.2f} GB ({r['pss_ratio']:.2f}x pool) "
                f"{r['anonymous_sum'] / 1e9:>24.2f} GB ({r['anonymous_ratio']:.2f}x)",
                flush=True,
            )


def sizes_part(work: Path, args) -> None:
    print("\n2. one process reading every image: its private memory against the pool's size")
    print(
        f"{'pool GB':>7} {'mode':>6} {'private MB added':>17} {'private MB in all':>18} "
        f"{'seconds':>8}"
    )
    for gb in [float(x) for x in args.sizes.split(",")]:
        root = make_pool(work, gb)
        for mode in ("mmap", "memory"):
            r = streamed(root, mode, work)
            print(
                f"{gb:>7g} {mode:>6} {r['anonymous'] / 1e6:>17.0f} "
                f"{r['total_anonymous'] / 1e6:>18.0f} {r['seconds']:>8.1f}",
                flush=True,
            )


def limit_part(work: Path, args) -> None:
    gb = max(float(x) for x in args.sizes.split(","))
    print(
        f"\n3. the {gb:g} GB pool under a {args.limit_gb:g} GB memory limit (a memory cgroup), "
        "its pages dropped from the page cache first"
    )
    for mode in ("mmap", "memory"):
        r = streamed(make_pool(work, gb), mode, work, args.limit_gb)
        state = r.get("error") or (
            f"read every image in {r['seconds']:.1f} s, "
            f"{r['total_anonymous'] / 1e6:.0f} MB private in all"
        )
        print(f"  {mode:>6}: {state}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-main"]:
        rank_main(*sys.argv[2:5])
    elif sys.argv[1:2] == ["--stream-main"]:
        stream_main(*sys.argv[2:5])
    else:
        main()
