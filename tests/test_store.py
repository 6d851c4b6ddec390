"""Where shard bytes come from (metadist/data/store.py): a real HTTP server on 127.0.0.1, with and
without a cache folder; its faults stopping the run naming the URL."""

import pytest
import torch

from metadist.data.prepare import shards_dir
from metadist.data.split import EpisodeSource
from metadist.data.store import ShardError
from metadist.distributed import free_port
from tests.conftest import copy_prepared, run_cli, small_overrides


def test_training_over_http_equals_training_on_the_folder(prepared, tmp_path, http_server):
    """The same run with its shards streamed from a real HTTP server on 127.0.0.1 (no raw data, no
    OMNIGLOT_DIR, another working folder) ends with the same weights as on the local folder; with
    a cache folder too; and evaluate reads the test split over HTTP."""
    import os

    from metadist.checkpoint import load_weights

    url = http_server(shards_dir(prepared.data))
    env = {k: v for k, v in os.environ.items() if k != "OMNIGLOT_DIR"}
    # 14 x 8 > 96: two epochs
    base = small_overrides("", tmp_path, **{"train.steps": 14, "train.val_every": 7})
    runs = {
        "local": [f"data.shards={shards_dir(prepared.data)}"],
        "http": [f"data.shards={url}"],
        "cached": [f"data.shards={url}/", f"data.cache_dir={tmp_path / 'cache'}"],
    }
    for name, extra in runs.items():
        r = run_cli("train", *base, *extra, f"run.name={name}", cwd=tmp_path, env=env)
        assert r.returncode == 0, (name, r.stderr[-2000:])
    w = {n: load_weights(tmp_path / "runs" / n / "model.safetensors")[0] for n in runs}
    assert all(torch.equal(w["local"][k], w[n][k]) for n in ("http", "cached") for k in w["local"])
    # every shard (3 pools; train, val, test) fetched once into the cache, beside its lock and stamp
    copies = [
        p for p in (tmp_path / "cache").iterdir() if p.is_file() and not p.name.startswith(".")
    ]
    assert len(copies) == 3 + 6 + 1 + 2
    r = run_cli(
        "evaluate", "--run", tmp_path / "runs" / "http", "--shards", url, cwd=tmp_path, env=env
    )
    assert r.returncode == 0 and '"episodes": 24' in r.stdout, r.stderr[-2000:]
    r = run_cli(
        "export-tasks",
        *base,
        f"data.shards={url}",
        "--out",
        tmp_path / "tasks",
        "--limit",
        "4",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(
        "predict",
        "--run",
        tmp_path / "runs" / "http",
        "--tasks",
        tmp_path / "tasks",
        "--out",
        tmp_path / "out.csv",
        cwd=tmp_path,
        env=env,
    )
    assert (
        r.returncode == 0 and len((tmp_path / "out.csv").read_text().splitlines()) == 1 + 4 * 5
    ), r.stderr[-2000:]


def test_http_faults_stop_naming_the_url(prepared, tmp_path, http_server):
    served = copy_prepared(prepared, tmp_path)
    url = http_server(served)
    (served / "train" / "train-000001.tar").unlink()  # 404
    data = (served / "train" / "train-000003.tar").read_bytes()
    # served truncated
    (served / "train" / "train-000003.tar").write_bytes(data[: len(data) // 2])
    src = EpisodeSource(url, "train")
    with pytest.raises(ShardError, match=r"train-000001\.tar \(HTTP error"):
        src.shard(1)
    with pytest.raises(
        ShardError, match=r"truncated or altered: http://127\.0\.0\.1:\d+/train/train-000003\.tar"
    ):
        src.shard(3)
    # nobody listens
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ShardError, match=rf"{closed}/val/manifest.json \(connection refused"):
        EpisodeSource(closed, "val")
    # and through train: one line naming the URL, exit 2
    r = run_cli(
        "train", *small_overrides("", tmp_path, **{"train.steps": 12}), f"data.shards={url}"
    )
    assert r.returncode == 2 and "/train/train-00000" in r.stderr.strip().splitlines()[-1], (
        r.stderr[-2000:]
    )
    r = run_cli(
        "train", *small_overrides("", tmp_path), f"data.shards={closed}", "run.name=refused"
    )
    assert r.returncode == 2 and closed in r.stderr and "connection refused" in r.stderr


# ---- checked once per node, fetched once per node ----


def _pool_entry(root, split="train"):
    from metadist.data.store import read_manifest

    m = read_manifest(root, split)
    return root / split / m["pool"][0]["name"], m["pool"][0]


def test_a_file_is_checked_once_and_again_when_it_changes(prepared, tmp_path):
    """The first check hashes (and stamps) the file; the next finds the stamp and skips it; a
    byte flipped in place, its size and modification time restored, is caught (the stamp holds
    the inode change time too) and named; a stamp that cannot be read is one line and a check."""
    import os

    from metadist.data.store import Stamps

    root = copy_prepared(prepared, tmp_path)
    path, entry = _pool_entry(root)
    said = []
    stamps = Stamps(tmp_path / "stamps", said.append)
    assert stamps.check(path, entry, 5) == entry["bytes"]
    assert stamps.check(path, entry, 5) == 0 and said == []
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ShardError, match=f"shard fails its checksum: {path}"):
        stamps.check(path, entry, 5)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert stamps.check(path, entry, 5) == entry["bytes"]
    stamp = next((tmp_path / "stamps").glob("*.json"))
    stamp.write_text("{not json")
    assert stamps.check(path, entry, 5) == entry["bytes"]
    assert (
        len(said) == 1
        and f"stamp {stamp} unreadable" in said[0]
        and f"checking {path} again" in said[0]
    )


def test_a_stamp_folder_that_cannot_be_written_is_one_line_and_training_goes_on(prepared, tmp_path):
    from metadist.data.store import Stamps

    path, entry = _pool_entry(copy_prepared(prepared, tmp_path))
    (tmp_path / "file").write_text("a file where the stamps' folder would be")
    said = []
    stamps = Stamps(tmp_path / "file" / "stamps", said.append)
    assert stamps.check(path, entry, 5) == entry["bytes"]
    assert stamps.check(path, entry, 5) == entry["bytes"]  # nothing recorded: checked again
    assert len(said) == 1 and "cannot record checked files in" in said[0]


def test_a_partial_download_of_a_dead_rank_is_replaced_and_a_live_holder_named(
    prepared, tmp_path, http_server
):
    import fcntl

    from metadist.data.store import Stamps, cache_name, fetch_once

    root = copy_prepared(prepared, tmp_path)
    url = http_server(root)
    _, entry = _pool_entry(root)
    cache, said = tmp_path / "cache", []
    stamps = Stamps(cache / "stamps", said.append)
    name = cache_name(f"{url}/train/{entry['name']}")
    cache.mkdir()
    (cache / f".{name}.part").write_bytes(b"half a shard")  # left by a rank that died
    (cache / f".{name}.lock").write_text("pid=999999 host=gone\n")
    got = fetch_once(f"{url}/train/{entry['name']}", entry, cache, stamps, 5)
    assert got.read_bytes() == (root / "train" / entry["name"]).read_bytes()
    assert any("partial download left by pid=999999 host=gone" in s for s in said)
    assert not (cache / f".{name}.part").exists()
    with open(cache / f".{name}.lock", "a+") as held:  # a live holder (this process)
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(
            ShardError, match=r"has held .* for over 0\.5 s \(data\.lock_timeout_s\)"
        ):
            fetch_once(f"{url}/train/{entry['name']}", entry, cache, stamps, 0.5)


def test_a_cache_on_a_full_disk_is_one_line_naming_it(prepared, tmp_path, http_server):
    """The node's cache cannot take the shard (a real write that fails: the file-size limit):
    one line naming data.cache_dir and what the shard needs, exit 2, no partial file left."""
    import resource
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    root = copy_prepared(prepared, tmp_path)
    url = http_server(root)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    args = small_overrides(
        "", tmp_path, **{"data.shards": url, "data.cache_dir": tmp_path / "cache"}
    )
    r = subprocess.run(
        [sys.executable, "-m", "metadist", "train", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=300,
    )
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"data.cache_dir={tmp_path / 'cache'}: cannot write" in line and "free space" in line
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".part")]


def test_a_leased_map_hears_of_a_truncation_before_it_happens(prepared, tmp_path):
    """Another process truncates a mapped pool shard: it is held back by the lease while this
    process learns of it (and can finish its step); the pages stay readable until it lets go."""
    import subprocess
    import sys
    import time

    from metadist.data import store

    path, _ = _pool_entry(copy_prepared(prepared, tmp_path))
    m = store.MappedFile(path)
    if not m.leased:
        pytest.skip("this file system grants no read lease")
    first = bytes(m.buffer[:4096])
    p = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(path)!r}, 10)"])
    deadline = time.time() + 10
    while store.mapped_fault() is None and time.time() < deadline:
        time.sleep(0.01)
    assert store.mapped_fault() == f"{path} was opened for writing or truncated by another process"
    assert p.poll() is None and bytes(m.buffer[:4096]) == first  # held back; still readable
    store._MAPPED.remove(m)
    m.buffer.close()
    import os

    os.close(m.fd)
    assert p.wait(timeout=60) == 0 and path.stat().st_size == 10
