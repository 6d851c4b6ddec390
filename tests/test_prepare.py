"""`metadist prepare`: byte-identical re-prepare and skip, another spec left alone (or replaced
with --overwrite), atomic splits, one writer per folder; and `ensure` (what train does): shards
alone are enough, and a folder holding another split is never rewritten."""

import subprocess
import sys
import time

import pytest

from metadist import config
from metadist.data.format import verify
from metadist.data.prepare import SplitDiffers, prepare, shards_dir
from metadist.data.store import read_manifest
from tests.conftest import run_cli, small_overrides

quiet = dict(log=lambda *a: None)


def test_same_seed_same_bytes_and_rerun_skips(omniglot_zips, tmp_path):
    cfg_a = config.load(None, small_overrides(omniglot_zips, tmp_path / "a"))
    cfg_b = config.load(None, small_overrides(omniglot_zips, tmp_path / "b"))
    prepare(cfg_a.data, **quiet)
    prepare(cfg_b.data, **quiet)
    for split in ("train", "val", "test"):
        fa = sorted((shards_dir(cfg_a.data) / split).iterdir())
        fb = sorted((shards_dir(cfg_b.data) / split).iterdir())
        assert [p.name for p in fa] == [p.name for p in fb]
        assert all(p.read_bytes() == q.read_bytes() for p, q in zip(fa, fb))
    mtimes = shard_files(shards_dir(cfg_a.data))
    said = []
    prepare(cfg_a.data, log=said.append)
    assert shard_files(shards_dir(cfg_a.data)) == mtimes
    assert sum("skipped" in s for s in said) == 3
    # what a node needs for these shards: the disk, and the page cache for the train pool
    train_pool = read_manifest(shards_dir(cfg_a.data), "train")["pool_bytes"]
    assert f"{train_pool / 1e9:.2f} GB of free memory to keep the train pool" in said[-1]
    # another data seed gives other episodes: prepare leaves the folder as it is, unless told to
    # replace it
    cfg_c = config.load(None, small_overrides(omniglot_zips, tmp_path / "a", **{"data.seed": 1}))
    with pytest.raises(SplitDiffers, match=r"data.seed=0 there, 1 asked.*--overwrite"):
        prepare(cfg_c.data, **quiet)
    assert shard_files(shards_dir(cfg_a.data)) == mtimes
    said = []
    prepare(cfg_c.data, log=said.append, overwrite=True)
    assert any("rebuilding" in s for s in said)
    assert (shards_dir(cfg_c.data) / "val" / "val-000000.tar").read_bytes() != (
        shards_dir(cfg_b.data) / "val" / "val-000000.tar"
    ).read_bytes()


def shard_files(root):
    """Every shard and manifest with its bytes' hash and mtime (the lock file is not data)."""
    import hashlib

    return {
        p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.rglob("*")
        if p.is_file() and p.name != ".prepare.lock"
    }


def test_the_run_seed_does_not_choose_the_episodes(omniglot_dir, tmp_path):
    """data.seed decides the split and the episodes; runs with other seeds use the same shards
    (and the default folder is named by the data settings, so it is the same folder)."""
    from metadist.data.prepare import ensure

    base = small_overrides(omniglot_dir, tmp_path)
    cfg = config.load(None, base)
    prepare(cfg.data, **quiet)
    files = shard_files(shards_dir(cfg.data))
    for seed in (1, 2, 3):
        other = config.load(None, base + [f"seed={seed}"])
        assert ensure(other.data, log=lambda s: pytest.fail(f"ensure said {s!r}")) == shards_dir(
            cfg.data
        )
    assert shard_files(shards_dir(cfg.data)) == files
    unnamed = [x for x in base if not x.startswith("data.shards=")]
    a, b = (shards_dir(config.load(None, unnamed + extra).data) for extra in ([], ["seed=4"]))
    c = shards_dir(config.load(None, unnamed + ["data.seed=4"]).data)
    assert a == b != c and str(a).startswith("data/shards/omniglot-alphabets-5w1s1q-")


def test_interrupted_prepare_leaves_no_split(omniglot_dir, tmp_path, monkeypatch):
    cfg = config.load(None, small_overrides(omniglot_dir, tmp_path))
    import metadist.data.format as fmt

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt, "sha256_file", boom)  # dies after the tars, before the manifest
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg.data, **quiet)
    assert not (shards_dir(cfg.data) / "train").exists()
    monkeypatch.undo()
    prepare(cfg.data, **quiet)
    verify(shards_dir(cfg.data) / "train")


def test_train_needs_only_the_shards_and_prepares_only_what_is_missing(omniglot_dir, tmp_path):
    """ensure(): matching manifests are used as they are (raw data never read); a missing split is
    the only one prepared, from raw data; a split that differs is never rewritten."""
    import shutil

    from metadist.data.prepare import ensure, mismatch

    cfg = config.load(None, small_overrides(omniglot_dir, tmp_path))
    prepare(cfg.data, **quiet)
    said = []
    no_raw = config.load(None, small_overrides(tmp_path / "nowhere", tmp_path))
    assert ensure(no_raw.data, log=said.append) == shards_dir(cfg.data) and said == []
    more = config.load(None, small_overrides(omniglot_dir, tmp_path, **{"data.val_episodes": 32}))
    assert "data.val_episodes=16 there, 32 asked" in mismatch(more.data, "val")
    files = shard_files(shards_dir(cfg.data))
    with pytest.raises(
        SplitDiffers,
        match=r"holds another val split \(data.val_episodes=16 there, 32 asked\).*data.shards",
    ):
        ensure(more.data, log=said.append)
    assert shard_files(shards_dir(cfg.data)) == files and said == []
    shutil.rmtree(shards_dir(cfg.data) / "val")
    train_files = {p: v for p, v in files.items() if p.parent.name == "train"}
    ensure(more.data, log=said.append)
    assert (
        any("preparing val" in s for s in said)
        and read_manifest(shards_dir(cfg.data) / "val")["episodes"] == 32
    )
    assert {
        p: v for p, v in shard_files(shards_dir(cfg.data)).items() if p.parent.name == "train"
    } == train_files


def _line_within(proc, seconds):
    import select

    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    if not ready:
        proc.kill()
        pytest.fail(f"no output within {seconds} s")
    return proc.stdout.readline()


def test_two_prepares_on_one_folder_do_not_interleave(omniglot_dir, tmp_path):
    """The second waits for the first (the lock names it), then finds every split up to date."""
    import fcntl

    args = small_overrides(omniglot_dir, tmp_path)
    root = shards_dir(config.load(None, args).data)
    root.mkdir(parents=True)
    with open(root / ".prepare.lock", "a+") as held:  # a first prepare, busy
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid=12345 host=elsewhere\n")
        held.flush()
        second = subprocess.Popen(
            [sys.executable, "-u", "-m", "metadist", "prepare", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first_line = _line_within(second, 120)
        assert (
            "preparing" in first_line
            and "pid=12345 host=elsewhere is doing it; waiting" in first_line
        )
        time.sleep(1)
        # waiting, nothing written
        assert second.poll() is None and not (root / "train").exists()
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-2000:]
    assert "wrote" in out
    third = run_cli("prepare", *args)
    assert third.returncode == 0 and third.stdout.count("skipped") == 3


def test_no_shards_and_no_raw_data_is_one_line_naming_the_split_and_the_url(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMNIGLOT_DIR"}
    r = run_cli(
        "train",
        f"data.shards={tmp_path / 'empty'}",
        "tracking.mode=disabled",
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert (
        "no usable train split" in line
        and str(tmp_path / "empty") in line
        and "metadist prepare" in line
    )
    assert "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip" in line
    assert "put images_background.zip and images_evaluation.zip in data/raw/omniglot" in line
