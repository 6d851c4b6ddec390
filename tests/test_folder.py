"""Your own dataset (data.source=folder): every layout (class folders with fractions, split lists,
mini-ImageNet CSVs, pre-split folders), grey and RGB, 28 and 84 pixels, made here in tmp; Omniglot
read through the folder path gives the native path's shards byte for byte; every bad input is one
line and exit 2 with nothing written; an 84x84 RGB run trains, evaluates and predicts end to end."""

import json
import shutil

import numpy as np
import pytest

from metadist import config
from metadist.data.prepare import prepare, shards_dir
from metadist.data.split import EpisodeSource
from metadist.data.store import read_manifest
from metadist.data.synthetic import FolderSpec, write_folder_dataset
from tests.conftest import folder_args, launch, run_cli, weights

quiet = dict(log=lambda *a: None)


@pytest.mark.parametrize("layout", ["fractions", "lists", "csv", "folders"])
@pytest.mark.parametrize("size,channels", [(28, 1), (84, 3)])
def test_every_layout_prepares_disjoint_splits_of_the_right_shape(tmp_path, layout, size, channels):
    root = write_folder_dataset(
        tmp_path / "raw",
        layout,
        FolderSpec(size=size, channels=channels, fmt="jpg" if channels == 3 else "png"),
    )
    cfg = config.load(None, folder_args(root, tmp_path, layout, size, channels))
    prepare(cfg.data, **quiet)
    ms = {s: read_manifest(shards_dir(cfg.data), s) for s in ("train", "val", "test")}
    classes = {s: set(m["classes"]) for s, m in ms.items()}
    assert (
        not (classes["train"] & classes["val"])
        and not (classes["train"] & classes["test"])
        and not (classes["val"] & classes["test"])
    )
    assert sum(map(len, classes.values())) == 15 and all(
        m["image_shape"] == [channels, size, size] for m in ms.values()
    )
    if layout != "fractions":  # the layout's own split
        assert [len(classes[s]) for s in ("train", "val", "test")] == [9, 3, 3]
    x = EpisodeSource(shards_dir(cfg.data), "test").all()[:]
    assert x.shape == (6, 9, channels, size, size) and x.dtype == np.uint8 and x.std() > 10


def test_the_same_data_in_every_layout_gives_the_same_shards(tmp_path):
    """lists, csv and folders name the same split of the same images: equal pools and episodes."""
    sums = {}
    for layout in ("lists", "csv", "folders"):
        root = write_folder_dataset(tmp_path / layout, layout, FolderSpec(size=32, channels=3))
        cfg = config.load(
            None, folder_args(root, tmp_path / layout, layout, 32, 3, **{"data.name": "same"})
        )
        prepare(cfg.data, **quiet)
        sums[layout] = [
            (
                p["sha256"]
                for p in read_manifest(shards_dir(cfg.data), s)["pool"]
                + read_manifest(shards_dir(cfg.data), s)["shards"]
            )
            for s in ("train", "val", "test")
        ]
        sums[layout] = [list(x) for x in sums[layout]]
    assert sums["lists"] == sums["csv"] == sums["folders"]


def _omniglot_lists(native_cfg, folder):
    """The native split's classes, as one list file per split."""
    folder.mkdir(parents=True)
    for s in ("train", "val", "test"):
        (folder / f"{s}.txt").write_text(
            "".join(c + "\n" for c in read_manifest(shards_dir(native_cfg.data), s)["classes"])
        )
    return folder


def test_omniglot_through_the_folder_path_equals_the_native_path(omniglot_dir, tmp_path):
    """The official folders, classes 3 deep (<set>/<alphabet>/<character>) under the folder holding
    both sets, the alphabets split as class lists, 1 channel, 28 px, inverted: byte-identical
    pool and episode shards to data.source=omniglot."""
    from tests.conftest import small_overrides

    native = config.load(None, small_overrides(omniglot_dir, tmp_path / "native"))
    prepare(native.data, **quiet)
    lists = _omniglot_lists(native, tmp_path / "lists")
    generic = config.load(
        None,
        small_overrides(omniglot_dir, tmp_path / "generic")
        + [
            "data.source=folder",
            "data.folder.split=lists",
            f"data.folder.split_dir={lists}",
            "data.folder.class_depth=3",
            "data.folder.invert=true",
            "data.image_size=28",
            "data.channels=1",
        ],
    )
    prepare(generic.data, **quiet)
    for s in ("train", "val", "test"):
        a, b = read_manifest(shards_dir(native.data), s), read_manifest(shards_dir(generic.data), s)
        assert a["classes"] == b["classes"] and a["class_images"] == b["class_images"]
        assert [p["sha256"] for p in a["pool"] + a["shards"]] == [
            p["sha256"] for p in b["pool"] + b["shards"]
        ], s


def _cli_prepare(args):
    r = run_cli("prepare", *args, timeout=300)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    return r, last


def _bad(tmp_path, layout="fractions", **extra):
    root = write_folder_dataset(tmp_path / "raw", layout, FolderSpec(size=28, channels=3))
    return root, folder_args(root, tmp_path, layout, 28, 3, **extra)


def _nothing_written(tmp_path):
    return not (tmp_path / "shards").exists()


def test_an_unreadable_image_is_one_line_naming_it(tmp_path):
    root, args = _bad(tmp_path)
    bad = root / "n00000004" / "n0000000400000002.png"
    bad.write_bytes(b"this is not a png")
    r, last = _cli_prepare(args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and _nothing_written(tmp_path)
    assert "cannot read image" in last and str(bad) in last


def test_a_truncated_image_is_one_line_naming_it(tmp_path):
    root = write_folder_dataset(
        tmp_path / "raw", "fractions", FolderSpec(size=28, channels=3, fmt="jpg")
    )
    args = folder_args(root, tmp_path, "fractions", 28, 3)
    bad = root / "n00000007" / "n0000000700000001.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    r, last = _cli_prepare(args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and _nothing_written(tmp_path)
    assert "cannot read image" in last and str(bad) in last


def test_a_class_too_small_for_an_episode_names_the_class_and_both_counts(tmp_path):
    # 1 + 5 = 6 images: every class has 6
    root, args = _bad(tmp_path, "lists", **{"data.queries": 5})
    for f in sorted((root / "n00000003").iterdir())[:3]:
        f.unlink()
    r, last = _cli_prepare(args)
    assert r.returncode == 2 and _nothing_written(tmp_path)
    assert "class 'n00000003'" in last and "has 3 images" in last and "shots + queries = 6" in last
    r, _ = _cli_prepare(args + ["data.folder.small_classes=skip"])
    assert r.returncode == 0 and "1 class(es) with fewer than 6 images left out" in r.stdout


def test_an_empty_root_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r, last = _cli_prepare(folder_args(tmp_path / "empty", tmp_path))
    assert (
        r.returncode == 2 and "no class folders with images" in last and _nothing_written(tmp_path)
    )
    r, last = _cli_prepare(folder_args(tmp_path / "missing", tmp_path))
    assert r.returncode == 2 and "does not exist" in last


def test_a_csv_without_the_columns_is_one_line(tmp_path):
    root, args = _bad(tmp_path, "csv")
    (root / "val.csv").write_text("image,class\nn0000000900000000.png,n00000009\n")
    r, last = _cli_prepare(args)
    assert r.returncode == 2 and _nothing_written(tmp_path)
    assert (
        str(root / "val.csv") in last and "filename,label" in last and "['image', 'class']" in last
    )


def test_a_split_list_naming_a_missing_class_is_one_line(tmp_path):
    root, args = _bad(tmp_path, "lists")
    with open(root / "splits" / "test.txt", "a") as f:
        f.write("n99999999\n")
    r, last = _cli_prepare(args)
    assert r.returncode == 2 and _nothing_written(tmp_path)
    assert "test.txt" in last and "'n99999999' does not exist" in last


def test_a_class_in_two_splits_is_one_line(tmp_path):
    root, args = _bad(tmp_path, "lists")
    with open(root / "splits" / "val.txt", "a") as f:
        f.write("n00000000\n")  # a train class
    r, last = _cli_prepare(args)
    assert r.returncode == 2 and _nothing_written(tmp_path)
    assert "'n00000000' is in both train and val" in last


def test_rgb_84_trains_evaluates_exports_and_predicts(tmp_path):
    root = write_folder_dataset(tmp_path / "raw", "csv", FolderSpec(size=84, channels=3, fmt="jpg"))
    args = folder_args(root, tmp_path, "csv")
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert s["steps"] == 3 and s["test_episodes"] == 6
    r = run_cli("evaluate", "--run", tmp_path / "runs" / "t")
    assert r.returncode == 0 and '"episodes": 6' in r.stdout, r.stderr[-2000:]
    shards = shards_dir(config.load(None, args).data)
    r = run_cli("export-tasks", *args, "--out", tmp_path / "tasks", "--limit", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    img = Image.open(tmp_path / "tasks" / "support" / "0001" / "image_2.png")
    assert img.mode == "RGB" and img.size == (84, 84)
    r = run_cli(
        "predict",
        "--run",
        tmp_path / "runs" / "t",
        "--tasks",
        tmp_path / "tasks",
        "--out",
        tmp_path / "out.csv",
    )
    assert (
        r.returncode == 0 and len((tmp_path / "out.csv").read_text().splitlines()) == 1 + 3 * 3 * 2
    ), r.stderr[-2000:]
    r = run_cli("show", *args, "--out", tmp_path / "grid.png", "--episodes", "2")
    assert r.returncode == 0 and Image.open(tmp_path / "grid.png").size[0] > 9 * 84
    assert shards.is_dir()
    # the shards are enough: train again without the raw data
    shutil.rmtree(tmp_path / "raw")
    r = run_cli("train", *args, "run.name=again")
    assert r.returncode == 0 and "preparing" not in r.stdout, r.stderr[-2000:]


def test_parallel_decoding_gives_the_same_images(tmp_path):
    from metadist.data.sources import folder

    root = write_folder_dataset(
        tmp_path / "raw",
        "fractions",
        FolderSpec(classes=6, images=4, size=40, channels=3, fmt="jpg"),
    )
    d = config.load(
        None,
        [
            f"data.raw={root}",
            "data.source=folder",
            "data.channels=3",
            "data.image_size=32",
            "data.folder.resize=crop",
        ],
    ).data
    a = folder.read_classes(d, 2, log=lambda *x: None, workers=1)
    b = folder.read_classes(d, 2, log=lambda *x: None, workers=2)
    assert a.names == b.names and all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert a.images[0].shape == (4, 3, 32, 32)


@pytest.mark.slow
def test_rgb_84_is_world_size_invariant_and_resumes_exactly(tmp_path):
    """84x84 RGB episodes from the pool format: 1 and 2 processes give the same weights bit for bit
    (exact mode, one thread each), and a 2-process run stopped at step 3 and resumed equals them."""

    root = write_folder_dataset(
        tmp_path / "raw", "folders", FolderSpec(size=84, channels=3, fmt="jpg")
    )
    args = folder_args(
        root, tmp_path, "folders", **{"train.steps": 6, "train.threads": 1, "data.task_aug": 0.5}
    )
    r = run_cli("prepare", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    for n, name, extra in (
        (1, "one", []),
        (2, "two", []),
        (2, "resumed", ["train.steps=3"]),
        (2, "resumed", []),
    ):
        r = launch(n, args + [f"run.name={name}", *extra])
        assert r.returncode == 0, r.stderr[-3000:]
    w = {name: weights(tmp_path / "runs" / name) for name in ("one", "two", "resumed")}
    assert all(w["one"][k].equal(w[n][k]) for n in ("two", "resumed") for k in w["one"])


@pytest.mark.long
def test_resnet12_at_84_trains_and_two_processes_equal_one(tmp_path):
    """ResNet-12 (64-160-320-640), second-order MAML, 5-way 1-shot at 84x84 RGB: a step end to end,
    and `accelerate launch` with 2 processes gives the 1-process weights bit for bit (exact mode,
    one thread each). With DropBlock (small widths, 32 px) too: its masks are named by seed, step
    and chunk. (A library network's exact groups at every world size: tests/test_library.py.)"""

    root = write_folder_dataset(
        tmp_path / "raw",
        "folders",
        FolderSpec(classes=21, images=4, split_counts=(11, 5, 5), size=84, channels=3, fmt="jpg"),
    )
    common = {
        "model.backbone": "resnet12",
        "data.ways": 5,
        "data.queries": 1,
        "train.meta_batch_size": 2,
        "train.steps": 1,
        "train.val_every": 1,
        "train.checkpoint_every": 1,
        "data.val_episodes": 2,
        "data.test_episodes": 2,
        "eval.inner_steps": 1,
        "eval.val_inner_steps": 1,
        "eval.tasks_per_batch": 2,
        "train.threads": 1,
        "algo.inner_lr": 0.01,
    }
    runs = {
        "full": folder_args(root, tmp_path, "folders", **common),
        "db": folder_args(
            root,
            tmp_path / "small",
            "folders",
            32,
            3,
            **dict(
                common, **{"model.widths": "8,12,16,20", "model.dropblock": 0.2, "train.steps": 3}
            ),
        ),
    }
    for case, args in runs.items():
        r = run_cli("prepare", *args)
        assert r.returncode == 0, r.stderr[-2000:]
        for n in (1, 2):
            r = launch(n, args + [f"run.name={case}{n}"])
            assert r.returncode == 0, r.stderr[-3000:]
    a, b = (weights(tmp_path / "runs" / f"full{n}") for n in (1, 2))
    assert a["blocks.3.conv3.weight"].shape == (640, 640, 3, 3) and a["head.weight"].shape == (
        5,
        640,
    )
    assert all(a[k].equal(b[k]) for k in a)
    a, b = (weights(tmp_path / "small" / "runs" / f"db{n}") for n in (1, 2))
    assert all(a[k].equal(b[k]) for k in a)
    r = launch(1, runs["db"] + ["run.name=nodb", "model.dropblock=0"])
    assert r.returncode == 0
    c = weights(tmp_path / "small" / "runs" / "nodb")
    assert not all(a[k].equal(c[k]) for k in a)  # DropBlock did drop something
