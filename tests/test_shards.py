"""Episode shards (format 2: a pool of images per split, episodes as records): manifest and
checksums, the world-size-independent reader (1/2/4 processes, start-at-step, workers, the
device-resident reader), and damaged or foreign shards stopping the run naming them."""
import shutil

import pytest
import torch

from metadist.data.prepare import shards_dir
from metadist.data.shards import EpisodeSource, MetaBatches, ShardError, meta_batches, read_manifest, verify
from tests.conftest import free_port, run_cli, small_overrides

quiet = dict(log=lambda *a: None)


def test_manifest_counts_and_checksums(prepared):
    for split, n in (("train", 96), ("val", 16), ("test", 24)):
        m = read_manifest(shards_dir(prepared) / split)
        assert m["episodes"] == n == sum(s["episodes"] for s in m["shards"])
        assert len(m["shards"]) == -(-n // 16) and len(m["classes"]) == len(m["class_images"]) > 0
        assert m["metadist_version"] and m["seed"] == 0 and m["protocol"] == "alphabets" and m["format"] == 2
        assert m["image_shape"] == [1, 28, 28] and sum(p["classes"] for p in m["pool"]) == len(m["classes"])
        assert m["bytes"] == sum(s["bytes"] for s in m["shards"] + m["pool"])
        verify(shards_dir(prepared) / split)


def _global_batch(cfg, step, world):
    parts = [MetaBatches(EpisodeSource(shards_dir(cfg) / "train", seed=cfg.seed), cfg.seed, 8, r, world, 0, 10, task_aug=0.5).batch_at(step)
             for r in range(world)]
    return {k: torch.cat([p[k] for p in parts]) for k in ("x_support", "x_query", "y_support", "y_query")}


@pytest.mark.parametrize("step", [0, 5, 13])          # 13 * 8 > 96 episodes: crosses into epoch 1
def test_same_global_meta_batch_for_1_2_4_processes(prepared, step):
    one = _global_batch(prepared, step, 1)
    assert one["x_support"].shape == (8, 5, 1, 28, 28) and one["x_query"].shape == (8, 5, 1, 28, 28)
    assert torch.equal(one["y_support"][0], torch.arange(5))
    for world in (2, 4):
        other = _global_batch(prepared, step, world)
        assert all(torch.equal(one[k], other[k]) for k in one)


def test_epoch_visits_every_episode_once(prepared):
    src = EpisodeSource(shards_dir(prepared) / "train", seed=0)
    seen = [src.locate(p) for p in range(src.size)]
    assert len(set(seen)) == src.size
    assert [src.locate(p) for p in range(src.size, 2 * src.size)] != seen   # next epoch, new order


def test_start_at_step_equals_skipping(prepared):
    d = shards_dir(prepared) / "train"
    full = list(meta_batches(d, 0, 8, 0, 1, 0, 8, task_aug=0.4))
    late = list(meta_batches(d, 0, 8, 0, 1, 5, 8, task_aug=0.4))
    assert [b["step"] for b in late] == [5, 6, 7]
    for a, b in zip(full[5:], late):
        assert torch.equal(a["x_support"], b["x_support"]) and torch.equal(a["x_query"], b["x_query"])


def test_workers_deliver_the_same_stream(prepared):
    d = shards_dir(prepared) / "train"
    ref = list(meta_batches(d, 0, 8, 1, 2, 0, 6))
    for workers in (1, 2):
        got = list(meta_batches(d, 0, 8, 1, 2, 0, 6, num_workers=workers))
        assert [int(b["step"]) for b in got] == list(range(6))
        assert all(torch.equal(a["x_query"], b["x_query"]) for a, b in zip(ref, got))


def _copy_prepared(prepared, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(shards_dir(prepared), dst)
    return dst


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "pool"])
def test_damaged_shard_stops_naming_it(prepared, tmp_path, damage):
    d = _copy_prepared(prepared, tmp_path) / "train"
    victim = d / ("pool-000000.tar" if damage == "pool" else "train-000002.tar")
    data = bytearray(victim.read_bytes())
    if damage in ("flip", "pool"):
        data[2000] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:3000]))
    else:
        victim.unlink()
    with pytest.raises(ShardError, match=victim.name):
        list(meta_batches(d, 0, 8, 0, 1, 0, 12))
    # train itself: manifests match, so no raw data is needed (none is given); 12 steps of 8 read
    # every episode of the epoch, so it must reach the damaged shard and stop naming it
    r = run_cli("train", *small_overrides("/nonexistent", tmp_path), f"data.shards={d.parent}", "train.steps=12")
    assert r.returncode == 2, r.stderr[-2000:]
    assert victim.name in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr


def test_reader_refuses_foreign_members(prepared, tmp_path):
    import io
    import tarfile
    d = _copy_prepared(prepared, tmp_path) / "val"
    bad = d / "val-000000.tar"
    with tarfile.open(bad, "w") as t:
        payload = b"cos\nsystem\n(S'echo hi'\ntR."
        info = tarfile.TarInfo("00000000.images.pyd")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    from metadist.data.shards import decode_records
    with pytest.raises(ShardError, match="unexpected member"):
        decode_records(str(bad), bad.read_bytes(), 1, 10, [20] * 8)


def test_records_pointing_outside_the_pool_are_refused(prepared):
    import io
    import numpy as np
    import webdataset as wds
    from metadist.data.shards import decode_records
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as sink:
        rec = np.zeros((10, 3), np.int32)
        rec[4, 1] = 25                                   # image 25 of a class of 20
        npy = io.BytesIO()
        np.save(npy, rec, allow_pickle=False)
        sink.write({"__key__": "00000000", "index.npy": npy.getvalue()})
    with pytest.raises(ShardError, match="points outside the split's 8 classes"):
        decode_records("crafted.tar", buf.getvalue(), 1, 10, [20] * 8)


def test_training_over_http_equals_training_on_the_folder(prepared, tmp_path, http_server):
    """The same run with its shards streamed from a real HTTP server on 127.0.0.1 (no raw data, no
    OMNIGLOT_DIR, another working folder) ends with the same weights as on the local folder; with
    a cache folder too; and evaluate reads the test split over HTTP."""
    import os

    from metadist.checkpoint import load_weights
    from metadist.data.prepare import shards_dir
    url = http_server(shards_dir(prepared))
    env = {k: v for k, v in os.environ.items() if k != "OMNIGLOT_DIR"}
    base = small_overrides("", tmp_path, **{"train.steps": 14, "train.val_every": 7})   # 14 x 8 > 96: two epochs
    runs = {"local": [f"data.shards={shards_dir(prepared)}"], "http": [f"data.shards={url}"],
            "cached": [f"data.shards={url}/", f"data.cache_dir={tmp_path / 'cache'}"]}
    for name, extra in runs.items():
        r = run_cli("train", *base, *extra, f"run.name={name}", cwd=tmp_path, env=env)
        assert r.returncode == 0, (name, r.stderr[-2000:])
    w = {n: load_weights(tmp_path / "runs" / n / "model.safetensors")[0] for n in runs}
    assert all(torch.equal(w["local"][k], w[n][k]) for n in ("http", "cached") for k in w["local"])
    assert len(list((tmp_path / "cache").iterdir())) == 3 + 6 + 1 + 2     # every shard (3 pools; train, val, test), cached once
    r = run_cli("evaluate", "--run", tmp_path / "runs" / "http", "--shards", url, cwd=tmp_path, env=env)
    assert r.returncode == 0 and '"episodes": 24' in r.stdout, r.stderr[-2000:]
    r = run_cli("export-tasks", *base, f"data.shards={url}", "--out", tmp_path / "tasks", "--limit", "4", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("predict", "--run", tmp_path / "runs" / "http", "--tasks", tmp_path / "tasks", "--out",
                tmp_path / "out.csv", cwd=tmp_path, env=env)
    assert r.returncode == 0 and len((tmp_path / "out.csv").read_text().splitlines()) == 1 + 4 * 5, r.stderr[-2000:]


def test_http_faults_stop_naming_the_url(prepared, tmp_path, http_server):
    served = _copy_prepared(prepared, tmp_path)
    url = http_server(served)
    (served / "train" / "train-000001.tar").unlink()                                   # 404
    data = (served / "train" / "train-000003.tar").read_bytes()
    (served / "train" / "train-000003.tar").write_bytes(data[: len(data) // 2])        # served truncated
    src = EpisodeSource(url, "train")
    with pytest.raises(ShardError, match=r"train-000001\.tar \(HTTP error"):
        src.shard(1)
    with pytest.raises(ShardError, match=r"truncated or altered: http://127\.0\.0\.1:\d+/train/train-000003\.tar"):
        src.shard(3)
    closed = f"http://127.0.0.1:{free_port()}"                                          # nobody listens
    with pytest.raises(ShardError, match=rf"{closed}/val/manifest.json \(connection refused"):
        EpisodeSource(closed, "val")
    # and through train: one line naming the URL, exit 2
    r = run_cli("train", *small_overrides("", tmp_path, **{"train.steps": 12}), f"data.shards={url}")
    assert r.returncode == 2 and "/train/train-00000" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    r = run_cli("train", *small_overrides("", tmp_path), f"data.shards={closed}", "run.name=refused")
    assert r.returncode == 2 and closed in r.stderr and "connection refused" in r.stderr


@pytest.mark.parametrize("world", [1, 2])
def test_device_resident_split_gives_the_same_batches(prepared, world):
    """The whole train split resident on the device (here the CPU stands in for it): the same
    batches as the streaming reader, with task augmentation, across an epoch boundary, any rank."""
    from metadist.data.shards import ResidentBatches
    src = EpisodeSource(shards_dir(prepared) / "train", seed=0)
    for rank in range(world):
        stream = MetaBatches(src, 0, 8, rank, world, 0, 14, task_aug=0.5)
        resident = ResidentBatches(src, 0, 8, rank, world, 0, 14, task_aug=0.5, device="cpu")
        for a, b in zip(stream, resident):
            assert a["step"] == b["step"] and all(torch.equal(a[k], b[k]) for k in a if k != "step")
