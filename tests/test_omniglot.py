"""Raw Omniglot: ingest from folders and zips, preprocessing, the documented splits, layout errors,
and the real data set in ../shared."""

import shutil

import numpy as np
import pytest
import torch

from metadist import config
from metadist.data.prepare import prepare
from metadist.data.sources import omniglot
from metadist.data.store import read_manifest
from tests.conftest import REAL_OMNIGLOT, run_cli, write_synthetic

quiet = dict(log=lambda *a: None)


def test_ingest_folder_and_zip_agree(omniglot_dir, omniglot_zips):
    a = omniglot.read_set(omniglot_dir, "images_background")
    b = omniglot.read_set(omniglot_zips, "images_background")
    assert a.names == b.names and np.array_equal(a.images, b.images) and a.sha256 == b.sha256
    assert a.images.shape == (24, 20, 1, 28, 28) and a.images.dtype == np.uint8
    # strokes bright on a dark background: the corners are background
    assert a.images[:, :, 0, 0, 0].max() == 0 and a.images.max() == 255


def test_preprocess_polarity_and_size():
    png = torch.full((1, 1, 105, 105), 255, dtype=torch.uint8)
    png[..., 40:60, :] = 0  # a dark horizontal stroke on white
    out = omniglot.preprocess(png)
    assert out.shape == (1, 1, 28, 28)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 13, 14] == 255
    assert omniglot.preprocess(png, 56).shape == (1, 1, 56, 56)  # data.image_size


@pytest.mark.parametrize("protocol", ["alphabets", "characters"])
def test_splits_are_disjoint_and_documented(omniglot_dir, protocol):
    bg, ev = (omniglot.read_set(omniglot_dir, s) for s in omniglot.SETS)
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
    with pytest.raises(omniglot.DataError, match=r"expected drawers 01\.\.20"):
        omniglot.read_set(root, "images_evaluation")


def test_real_omniglot_counts_and_splits(tmp_path):
    """The real data in ../shared: official counts, both protocols, disjoint, small shards."""
    assert REAL_OMNIGLOT.is_dir(), f"the real Omniglot is expected at {REAL_OMNIGLOT}"
    bg, ev = (omniglot.read_set(REAL_OMNIGLOT, s) for s in omniglot.SETS)
    assert (len({a for a, _ in bg.names}), len(bg.names)) == (30, 964)
    assert (len({a for a, _ in ev.names}), len(ev.names)) == (20, 659)
    names, images = omniglot.pool(bg, ev)
    assert images.shape == (1623, 20, 1, 28, 28)
    for protocol, sizes in (("alphabets", (771, 193, 659)), ("characters", (1100, 100, 423))):
        s = omniglot.make_splits(names, protocol, seed=0)
        got = tuple(len(s[k].chars) for k in ("train", "val", "test"))
        assert got == sizes
        assert len(set(s["train"].chars) | set(s["val"].chars) | set(s["test"].chars)) == sum(sizes)
    cfg = config.load(
        None,
        [
            f"data.raw={REAL_OMNIGLOT}",
            f"data.shards={tmp_path}",
            "data.train_episodes=50",
            "data.val_episodes=20",
            "data.test_episodes=640",
            "data.protocol=characters",
        ],
    )
    prepare(cfg.data, **quiet)
    m = read_manifest(tmp_path / "test")
    src = m["source_info"]
    assert (
        src["images_background"]["alphabets"],
        src["images_background"]["characters"],
        src["images_background"]["images"],
    ) == (30, 964, 19280)
    assert (
        src["images_evaluation"]["alphabets"],
        src["images_evaluation"]["characters"],
        src["images_evaluation"]["images"],
    ) == (20, 659, 13180)
    assert (
        m["episodes"] == 640
        and len(m["classes"]) == 423
        and m["rotations_deg"] == [0, 90, 180, 270]
    )
    train_chars = set(read_manifest(tmp_path / "train")["classes"])
    assert not train_chars & set(m["classes"])
