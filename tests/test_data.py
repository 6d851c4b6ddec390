"""Data path: ingest, splits, episode layout, shards (round trip, determinism, atomicity, errors)
and the streaming reader (world-size invariance, start-at-step, workers)."""
import json
import shutil

import numpy as np
import pytest
import torch

from metadist import config
from metadist.data import omniglot
from metadist.data.episodes import labels, rotate_tasks, task_rotations
from metadist.data.prepare import prepare, shards_dir
from metadist.data.shards import EpisodeSource, MetaBatches, ShardError, meta_batches, read_manifest, verify
from tests.conftest import REAL_OMNIGLOT, run_cli, small_overrides, write_synthetic

quiet = dict(log=lambda *a: None)


def test_ingest_folder_and_zip_agree(omniglot_dir, omniglot_zips):
    a = omniglot.load(omniglot_dir, "images_background")
    b = omniglot.load(omniglot_zips, "images_background")
    assert a.names == b.names and np.array_equal(a.images, b.images) and a.sha256 == b.sha256
    assert a.images.shape == (24, 20, 28, 28) and a.images.dtype == np.uint8
    # strokes bright on a dark background: the corners are background
    assert a.images[:, :, 0, 0].max() == 0 and a.images.max() == 255


def test_preprocess_polarity_and_size():
    png = torch.full((1, 1, 105, 105), 255, dtype=torch.uint8)
    png[..., 40:60, :] = 0                         # a dark horizontal stroke on white
    out = omniglot.preprocess(png)
    assert out.shape == (1, 28, 28)
    assert out[0, 0, 0] == 0 and out[0, 13, 14] == 255


@pytest.mark.parametrize("protocol", ["alphabets", "characters"])
def test_splits_are_disjoint_and_documented(omniglot_dir, protocol):
    bg, ev = (omniglot.load(omniglot_dir, s) for s in omniglot.SETS)
    names, _ = omniglot.pool(bg, ev)
    s = omniglot.make_splits(names, protocol, seed=0)
    sets = [set(s[k].chars) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == 36
    if protocol == "alphabets":
        assert all(names[c][0] == "images_evaluation" for c in s["test"].chars)
        assert all(names[c][0] == "images_background" for c in s["train"].chars + s["val"].chars)
        assert len(s["val"].chars) == round(0.2 * 24)
    else:
        assert s["train"].rotations == (0, 1, 2, 3)
    assert omniglot.make_splits(names, protocol, seed=0)["val"].chars == s["val"].chars
    assert omniglot.make_splits(names, protocol, seed=1)["val"].chars != s["val"].chars


def test_episode_layout_matches_labels(prepared):
    """Support first, then query, class-major; each class's images are drawings of its character."""
    d = shards_dir(prepared) / "train"
    m = read_manifest(d)
    src = EpisodeSource(d)
    x = src.shard(0)[3]
    bg = omniglot.load(prepared.data.raw, "images_background")
    import webdataset as wds
    meta = [json.loads(s["classes.json"]) for s in wds.DataPipeline(
        wds.SimpleShardList([str(d / m["shards"][0]["name"])]), wds.tarfile_to_samples())][3]
    ways, shots, queries = m["ways"], m["shots"], m["queries"]
    ys, yq = labels(ways, shots), labels(ways, queries)
    assert x.shape == (ways * (shots + queries), 28, 28)
    for i, img in enumerate(x):
        c = (ys[i] if i < ways * shots else yq[i - ways * shots]).item()
        cls = meta["classes"][c]
        drawings = bg.images[bg.names.index((cls["alphabet"], cls["character"]))]
        assert any(np.array_equal(img, d_) for d_ in drawings), f"image {i} is not a drawing of class {c}"


def test_manifest_counts_and_checksums(prepared):
    for split, n in (("train", 96), ("val", 16), ("test", 24)):
        m = read_manifest(shards_dir(prepared) / split)
        assert m["episodes"] == n == sum(s["episodes"] for s in m["shards"])
        assert len(m["shards"]) == -(-n // 16) and len(m["characters"]) > 0
        assert m["metadist_version"] and m["seed"] == 0 and m["protocol"] == "alphabets"
        verify(shards_dir(prepared) / split)


def test_same_seed_same_bytes_and_rerun_skips(omniglot_zips, tmp_path):
    cfg_a = config.load(None, small_overrides(omniglot_zips, tmp_path / "a"))
    cfg_b = config.load(None, small_overrides(omniglot_zips, tmp_path / "b"))
    prepare(cfg_a, **quiet)
    prepare(cfg_b, **quiet)
    for split in ("train", "val", "test"):
        fa = sorted((shards_dir(cfg_a) / split).iterdir())
        fb = sorted((shards_dir(cfg_b) / split).iterdir())
        assert [p.name for p in fa] == [p.name for p in fb]
        assert all(p.read_bytes() == q.read_bytes() for p, q in zip(fa, fb))
    mtimes = {p: p.stat().st_mtime_ns for p in shards_dir(cfg_a).rglob("*")}
    said = []
    prepare(cfg_a, log=said.append)
    assert {p: p.stat().st_mtime_ns for p in shards_dir(cfg_a).rglob("*")} == mtimes
    assert sum("skipped" in s for s in said) == 3
    # another seed gives other episodes, and the split is rebuilt, not skipped
    cfg_c = config.load(None, small_overrides(omniglot_zips, tmp_path / "a", seed=1))
    said = []
    prepare(cfg_c, log=said.append)
    assert any("rebuilding" in s for s in said)
    assert (shards_dir(cfg_c) / "val" / "val-000000.tar").read_bytes() != (shards_dir(cfg_b) / "val" / "val-000000.tar").read_bytes()


def test_interrupted_prepare_leaves_no_split(omniglot_dir, tmp_path, monkeypatch):
    cfg = config.load(None, small_overrides(omniglot_dir, tmp_path))
    import metadist.data.shards as shards

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards, "sha256_file", boom)     # dies after the tars, before the manifest
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, **quiet)
    assert not (shards_dir(cfg) / "train").exists()
    monkeypatch.undo()
    prepare(cfg, **quiet)
    verify(shards_dir(cfg) / "train")


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


def test_task_augmentation_rotates_whole_tasks():
    ks = task_rotations(0, 3, range(200), 0.4)
    assert set(ks) <= {0, 1, 3} and 0.25 < np.mean([k != 0 for k in ks]) < 0.55
    assert task_rotations(0, 3, range(200), 0.4) == ks
    x = torch.rand(2, 3, 1, 28, 28)
    y = rotate_tasks(x, [1, 0])
    assert torch.equal(y[1], x[1]) and torch.equal(y[0], torch.rot90(x[0], 1, dims=(-2, -1)))


def _copy_prepared(prepared, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(shards_dir(prepared), dst)
    return dst


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_stops_naming_it(prepared, tmp_path, damage):
    d = _copy_prepared(prepared, tmp_path) / "train"
    victim = d / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[2000] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:3000]))
    else:
        victim.unlink()
    with pytest.raises(ShardError, match="train-000002.tar"):
        list(meta_batches(d, 0, 8, 0, 1, 0, 12))
    r = run_cli("train", *small_overrides(prepared.data.raw, tmp_path), f"data.shards={d.parent}",
                "data.raw=/nonexistent")
    assert r.returncode != 0


def test_reader_refuses_foreign_members(prepared, tmp_path):
    import tarfile, io
    d = _copy_prepared(prepared, tmp_path) / "val"
    bad = d / "val-000000.tar"
    with tarfile.open(bad, "w") as t:
        payload = b"cos\nsystem\n(S'echo hi'\ntR."
        info = tarfile.TarInfo("00000000.images.pyd")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    from metadist.data.shards import load_shard
    with pytest.raises(ShardError, match="unexpected member"):
        load_shard(bad, 1)


def test_missing_data_folder_exits_nonzero(tmp_path):
    r = run_cli("prepare", f"data.raw={tmp_path / 'nowhere'}", f"data.shards={tmp_path / 's'}")
    assert r.returncode == 2 and "images_background" in r.stderr


def test_wrong_layout_is_a_clear_error(tmp_path):
    root = write_synthetic(tmp_path / "raw", chars_per_alphabet=5)
    extra = root / "images_background" / "Alpha" / "character01" / "notes.png"
    shutil.copy(next((root / "images_background" / "Alpha" / "character01").glob("*.png")), extra)
    r = run_cli("prepare", f"data.raw={root}", f"data.shards={tmp_path / 's'}")
    assert r.returncode == 2 and "unexpected entry" in r.stderr and "notes.png" in r.stderr
    extra.unlink()
    next((root / "images_evaluation" / "Omega" / "character02").glob("*_07.png")).unlink()
    with pytest.raises(omniglot.DataError, match="expected drawers 01..20"):
        omniglot.load(root, "images_evaluation")


def test_export_tasks_layout_and_show(prepared, tmp_path):
    from metadist.data.export import export_tasks, show
    src = EpisodeSource(shards_dir(prepared) / "test")
    n = export_tasks(src.all(3), 5, 1, 1, tmp_path / "tasks")
    assert n == 3
    assert sorted(p.name for p in (tmp_path / "tasks" / "support").iterdir()) == ["0000", "0001", "0002"]
    assert sorted(p.name for p in (tmp_path / "tasks" / "query" / "0001").iterdir()) == [f"image_{i}.png" for i in range(5)]
    from metadist.evaluate import read_task_folder
    tid, sx, qx = read_task_folder(tmp_path / "tasks")[1]
    x = src.all(3)[1]
    assert tid == "0001" and np.array_equal(sx.numpy(), x[:5]) and np.array_equal(qx.numpy(), x[5:])
    png = show(src.all(4), 5, 1, 1, tmp_path / "grid.png", task_aug=1.0)
    from PIL import Image
    w, h = Image.open(png).size
    assert w > 11 * 28 and h > 4 * 28


def test_real_omniglot_counts_and_splits(tmp_path):
    """The real data in ../shared: official counts, both protocols, disjoint, small shards."""
    assert REAL_OMNIGLOT.is_dir(), f"the real Omniglot is expected at {REAL_OMNIGLOT}"
    bg, ev = (omniglot.load(REAL_OMNIGLOT, s) for s in omniglot.SETS)
    assert (len({a for a, _ in bg.names}), len(bg.names)) == (30, 964)
    assert (len({a for a, _ in ev.names}), len(ev.names)) == (20, 659)
    names, images = omniglot.pool(bg, ev)
    assert images.shape == (1623, 20, 28, 28)
    for protocol, sizes in (("alphabets", (771, 193, 659)), ("characters", (1100, 100, 423))):
        s = omniglot.make_splits(names, protocol, seed=0)
        got = tuple(len(s[k].chars) for k in ("train", "val", "test"))
        assert got == sizes
        assert len(set(s["train"].chars) | set(s["val"].chars) | set(s["test"].chars)) == sum(sizes)
    cfg = config.load(None, [f"data.raw={REAL_OMNIGLOT}", f"data.shards={tmp_path}", "data.train_episodes=50",
                             "data.val_episodes=20", "data.test_episodes=640", "data.protocol=characters"])
    prepare(cfg, **quiet)
    m = read_manifest(tmp_path / "test")
    src = m["source"]
    assert (src["images_background"]["alphabets"], src["images_background"]["characters"], src["images_background"]["images"]) == (30, 964, 19280)
    assert (src["images_evaluation"]["alphabets"], src["images_evaluation"]["characters"], src["images_evaluation"]["images"]) == (20, 659, 13180)
    assert m["episodes"] == 640 and len(m["characters"]) == 423 and m["rotations_deg"] == [0, 90, 180, 270]
    train_chars = set(read_manifest(tmp_path / "train")["characters"])
    assert not train_chars & set(m["characters"])
