"""The shard format (metadist/data/format.py): manifest and checksums, and damaged or foreign
shards stopping the run naming them."""

import pytest

from metadist.data.device import meta_batches
from metadist.data.format import decode_records, verify
from metadist.data.order import StreamSpec
from metadist.data.prepare import shards_dir
from metadist.data.store import ShardError, read_manifest
from tests.conftest import copy_prepared, run_cli, small_overrides


def test_manifest_counts_and_checksums(prepared):
    for split, n in (("train", 96), ("val", 16), ("test", 24)):
        m = read_manifest(shards_dir(prepared.data) / split)
        assert m["episodes"] == n == sum(s["episodes"] for s in m["shards"])
        assert len(m["shards"]) == -(-n // 16) and len(m["classes"]) == len(m["class_images"]) > 0
        assert (
            m["metadist_version"]
            and m["seed"] == 0
            and m["protocol"] == "alphabets"
            and m["format"] == 2
        )
        assert m["image_shape"] == [1, 28, 28] and sum(p["classes"] for p in m["pool"]) == len(
            m["classes"]
        )
        assert m["bytes"] == sum(s["bytes"] for s in m["shards"] + m["pool"])
        verify(shards_dir(prepared.data) / split)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "pool"])
def test_damaged_shard_stops_naming_it(prepared, tmp_path, damage):
    d = copy_prepared(prepared, tmp_path) / "train"
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
        list(meta_batches(d, StreamSpec(0, 8, 0, 1, 0, 12)))
    # train itself: manifests match, so no raw data is needed (none is given); 12 steps of 8 read
    # every episode of the epoch, so it must reach the damaged shard and stop naming it
    r = run_cli(
        "train",
        *small_overrides("/nonexistent", tmp_path),
        f"data.shards={d.parent}",
        "train.steps=12",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert victim.name in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr


def test_reader_refuses_foreign_members(prepared, tmp_path):
    import io
    import tarfile

    d = copy_prepared(prepared, tmp_path) / "val"
    bad = d / "val-000000.tar"
    with tarfile.open(bad, "w") as t:
        payload = b"cos\nsystem\n(S'echo hi'\ntR."
        info = tarfile.TarInfo("00000000.images.pyd")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardError, match="unexpected member"):
        decode_records(str(bad), bad.read_bytes(), 1, 10, [20] * 8)


def test_records_pointing_outside_the_pool_are_refused(prepared):
    import io

    import numpy as np
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as sink:
        rec = np.zeros((10, 3), np.int32)
        rec[4, 1] = 25  # image 25 of a class of 20
        npy = io.BytesIO()
        np.save(npy, rec, allow_pickle=False)
        sink.write({"__key__": "00000000", "index.npy": npy.getvalue()})
    with pytest.raises(ShardError, match="points outside the split's 8 classes"):
        decode_records("crafted.tar", buf.getvalue(), 1, 10, [20] * 8)
