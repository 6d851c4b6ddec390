"""One image pool per node, read in place (metadist/data/store.py and split.py), with real
processes and files: the ranks of a node share one copy of the pool (accelerate launch, PSS from
/proc); two ranks fetch each URL shard once (a real HTTP server on 127.0.0.1 counting requests);
a pool shard truncated under a running job stops it with one line, its last checkpoint intact;
and the mapped pool trains the same weights as a decoded copy."""

import json
import subprocess
import sys
import time

import pytest

from bench.pool_memory import make_pool, ranks_share
from tests.conftest import ROOT, folder_args, launch, launch_cmd, run_cli, small_overrides, weights

pytestmark = pytest.mark.slow


def test_the_ranks_of_a_node_hold_one_copy_of_the_pool(tmp_path):
    """1, 2 and 4 ranks each read every image of one pool: with data.pool=mmap the PSS of their
    maps adds up to the pool's bytes (at most 1.1x) and reading it added no private copy; the
    same measurement of data.pool=memory sees a copy per rank (so it can tell the difference)."""
    root = make_pool(tmp_path, 0.03)
    for n in (1, 2, 4):
        r = ranks_share(root, n, "mmap", tmp_path)
        assert 0.9 <= r["pss_ratio"] <= 1.1 and r["anonymous_ratio"] < 0.25, r
    r = ranks_share(root, 2, "memory", tmp_path)
    assert r["pss_ratio"] < 0.05 and r["anonymous_ratio"] >= 1.8, r


def test_two_ranks_fetch_each_url_shard_once(prepared, tmp_path, http_server):
    """Two ranks (accelerate launch) train from shards served over HTTP with a node cache: the
    server's log shows one GET per shard file (pool and episodes, every split), and the run
    equals the same run on the local folder."""
    from tests.conftest import copy_prepared

    served = copy_prepared(prepared, tmp_path)
    log = tmp_path / "requests.log"
    url = http_server(served, log=log)
    # 12 steps of 8 read all 96 train episodes: every shard is needed once
    base = small_overrides("", tmp_path, **{"train.steps": 12, "train.threads": 1})
    cached = [f"data.shards={url}", f"data.cache_dir={tmp_path / 'node-cache'}", "run.name=http"]
    r = launch(2, base + cached)
    assert r.returncode == 0, r.stderr[-3000:]
    gets = [
        line.split('"GET ')[1].split(" ")[0]
        for line in log.read_text().splitlines()
        if '"GET ' in line
    ]
    shards = [
        f"/{s}/{p.name}" for s in ("train", "val", "test") for p in (served / s).glob("*.tar")
    ]
    assert len(shards) == 12 and {s: gets.count(s) for s in shards} == dict.fromkeys(shards, 1)
    r = launch(2, base + [f"data.shards={served}", "run.name=local"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "runs" / "http"), weights(tmp_path / "runs" / "local")
    assert all(a[k].equal(b[k]) for k in a)


def test_a_pool_shard_truncated_under_a_run_stops_it_with_one_line(prepared, tmp_path):
    """A real truncation of the train pool during a 2-process run: the truncating process waits
    (the ranks' leases), both ranks stop at the same step and write its checkpoint, the launch
    fails with one line naming the file (exit 2 from the ranks), and no rank dies of SIGBUS; the
    checkpoints are intact and readable."""
    from metadist.checkpoint import CheckpointManager, load_weights
    from tests.conftest import copy_prepared

    shards = copy_prepared(prepared, tmp_path)
    args = small_overrides(
        "",
        tmp_path,
        **{
            "data.shards": shards,
            "train.steps": 400,
            "train.log_every": 1,
            "train.checkpoint_every": 3,
            "train.val_every": 1000,
            "model.hidden": 16,
        },
    )
    proc = subprocess.Popen(
        launch_cmd(2, args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
    deadline = time.time() + 300
    while (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 5
    ) and time.time() < deadline:
        time.sleep(0.05)
    victim = shards / "train" / "pool-000000.tar"
    cut = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(victim)!r}, 1000)"])
    _, err = proc.communicate(timeout=120)
    assert cut.wait(timeout=120) == 0 and victim.stat().st_size == 1000
    assert proc.returncode != 0 and "SIGBUS" not in err and "Bus error" not in err
    lines = [x for x in err.splitlines() if x.startswith("metadist train: error:")]
    assert len(lines) == 2 and all(
        str(victim) in x and "truncated by another process" in x for x in lines
    ), err[-3000:]
    at = int(lines[0].split("stopped after step ")[1].split(",")[0])
    run = tmp_path / "runs" / "t"
    latest = CheckpointManager(run, 3, 2, False, None, {}).latest()
    assert (
        latest.name == f"step_{at:06d}"
        and json.loads((latest / "meta.json").read_text())["step"] == at
    )
    assert load_weights(latest / "model.safetensors")[0]


def test_the_mapped_pool_trains_the_same_weights_as_a_decoded_copy(tmp_path):
    """data.pool=mmap against data.pool=memory, same command otherwise: an 84x84 RGB folder
    dataset 10 steps (one process) and a 2-process exact run give the same weights bit for bit."""
    from metadist.data.synthetic import FolderSpec, write_folder_dataset

    root = write_folder_dataset(
        tmp_path / "raw", "folders", FolderSpec(size=84, channels=3, fmt="jpg")
    )
    args = folder_args(
        root,
        tmp_path,
        "folders",
        **{"train.steps": 10, "train.threads": 1, "train.reduce": "exact"},
    )
    assert run_cli("prepare", *args).returncode == 0
    for n in (1, 2):
        for pool in ("mmap", "memory"):
            r = launch(n, args + [f"data.pool={pool}", f"run.name={pool}{n}"])
            assert r.returncode == 0, r.stderr[-3000:]
        a, b = weights(tmp_path / "runs" / f"mmap{n}"), weights(tmp_path / "runs" / f"memory{n}")
        assert all(a[k].equal(b[k]) for k in a), n
