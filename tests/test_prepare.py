"""`metadist prepare`: byte-identical re-prepare and skip, rebuild on another spec, atomic splits;
and `ensure` (what train does): shards alone are enough."""

import pytest

from metadist import config
from metadist.data.prepare import prepare, shards_dir
from metadist.data.shards import read_manifest, verify
from tests.conftest import run_cli, small_overrides

quiet = dict(log=lambda *a: None)


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


def test_train_needs_only_the_shards_and_prepares_only_what_differs(omniglot_dir, tmp_path):
    """ensure(): matching manifests are used as they are (raw data never read); a split whose
    manifest differs is the only one prepared, from raw data."""
    from metadist.data.prepare import ensure, mismatch
    cfg = config.load(None, small_overrides(omniglot_dir, tmp_path))
    prepare(cfg, **quiet)
    said = []
    no_raw = config.load(None, small_overrides(tmp_path / "nowhere", tmp_path))
    assert ensure(no_raw, log=said.append) == shards_dir(cfg) and said == []
    more = config.load(None, small_overrides(omniglot_dir, tmp_path, **{"data.val_episodes": 32}))
    assert "episodes 16 (want 32)" in mismatch(more, "val")
    before = {p: p.stat().st_mtime_ns for p in (shards_dir(cfg) / "train").iterdir()}
    ensure(more, log=said.append)
    assert any("preparing val" in s for s in said) and read_manifest(shards_dir(cfg) / "val")["episodes"] == 32
    assert {p: p.stat().st_mtime_ns for p in (shards_dir(cfg) / "train").iterdir()} == before


def test_no_shards_and_no_raw_data_is_one_line_naming_the_split_and_the_url(tmp_path):
    import os
    env = {k: v for k, v in os.environ.items() if k != "OMNIGLOT_DIR"}
    r = run_cli("train", f"data.shards={tmp_path / 'empty'}", "tracking.mode=disabled", cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "no usable train split" in line and str(tmp_path / "empty") in line and "metadist prepare" in line
    assert "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip" in line
    assert "put images_background.zip and images_evaluation.zip in data/raw/omniglot" in line
