"""Many sources in one run (data.sources): each task's source drawn by weight from (seed, step,
task), whatever the world size; each source's episodes taken in its own order; per-source
training accuracy, val and test tables; the run folder's sources.json; `metadist evaluate` per
source and on a source never trained on; sources that do not mix refused in one line."""

import json
import math
import shutil

import numpy as np
import pytest

from metadist.data.order import MixedBatches, SourceMix, StreamSpec
from metadist.data.roots import source_names
from metadist.data.split import EpisodeSource, pad_batch
from tests.conftest import run_cli, sources_overrides, variable_source


def test_each_sources_episodes_are_taken_in_order_whatever_the_block():
    mix = SourceMix([1.0, 3.0], seed=0, batch=8)
    mix.BLOCK = 5  # cross several blocks of draws
    seen = [[], []]
    for step in range(23):
        src, pos = mix.at(step)
        for s, p in zip(src, pos):
            seen[s].append(p)
    # the n-th task drawn from a source reads its n-th episode: none skipped, none twice
    assert all(seq == list(range(len(seq))) for seq in seen)
    # a mix made anew (a resumed run) finds the same at any step
    fresh = SourceMix([1.0, 3.0], seed=0, batch=8)
    fresh.BLOCK = 5
    assert all(np.array_equal(a, b) for a, b in zip(fresh.at(17), mix.at(17)))


def test_sources_are_drawn_by_weight_within_a_bound_from_the_sample_count():
    mix = SourceMix([1.0, 1.0, 2.0], seed=3, batch=16)
    n = 2000 * 16
    counts = np.bincount(np.concatenate([mix.at(s)[0] for s in range(2000)]), minlength=3)
    for c, p in zip(counts, (0.25, 0.25, 0.5)):
        assert abs(c - n * p) < 5 * math.sqrt(n * p * (1 - p)), counts
    other = SourceMix([1.0, 1.0, 2.0], seed=4, batch=16)
    assert not np.array_equal(other.at(0)[0], mix.at(0)[0])


def test_rank_shares_are_the_one_process_batch(variable_sources):
    """Each rank's tasks are the rows of the single process's batch: the draw depends on (seed,
    step, task) alone."""
    splits = [EpisodeSource(r, "train", 0) for r in variable_sources]
    one = MixedBatches(splits, [1.0, 1.0], StreamSpec(0, 8, 0, 1, 0, 3))
    for step in range(3):
        whole = one.batch_at(step)
        assert whole["source"].sum(0).tolist() != [0.0, 8.0]  # both sources appear somewhere
        for rank in range(4):
            part = MixedBatches(splits, [1.0, 1.0], StreamSpec(0, 8, rank, 4, 0, 3)).batch_at(step)
            rows = slice(2 * rank, 2 * rank + 2)
            assert (part["source"] == whole["source"][rows]).all()
            assert (part["ways"] == whole["ways"][rows]).all()
            for k in ("x_support", "x_query"):
                n = part[k].shape[1]
                assert (part[k] == whole[k][rows, :n]).all()  # padded to the share's largest
    # and the tasks are the sources' own episodes at the mix's positions
    src, pos = one.mix.at(1)
    recs = [splits[s].records_at([p])[0] for s, p in zip(src, pos)]
    want = pad_batch(recs, [splits[s].gather for s in src])
    got = one.batch_at(1)
    assert all((got[k] == want[k]).all() for k in want)


def test_two_sources_train_with_per_source_tables(variable_sources, tmp_path):
    # copies: the last part re-prepares one
    sources = [shutil.copytree(s, tmp_path / s.name) for s in variable_sources]
    args = sources_overrides(sources, tmp_path)
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    names = source_names(sources)
    assert names == ["omniglot", "folder"]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [x for x in recs if "loss" in x]
    assert all(0 <= (x[f"accuracy/{n}"] or 0) <= 1 for x in trained for n in names)
    assert all(f"val_accuracy/{n}" in x for x in recs if "val_accuracy" in x for n in names)
    summary = json.loads((run / "summary.json").read_text())
    rows = summary["test_sources"]
    assert list(rows) == names and all(rows[n]["episodes"] == 10 for n in names)
    assert summary["test_accuracy"] == pytest.approx(np.mean([rows[n]["accuracy"] for n in names]))
    assert "test source" in r.stdout + r.stderr and "mean" in r.stdout + r.stderr
    record = json.loads((run / "sources.json").read_text())
    assert [record[n]["root"] for n in names] == [str(v) for v in sources]
    assert set(record["omniglot"]["manifests"]) == {"train", "val", "test"}

    # evaluate: the run's sources as a table, the same figures as the run's own test
    e = run_cli("evaluate", "--run", run)
    assert e.returncode == 0, e.stderr[-2000:]
    out = json.loads(e.stdout.splitlines()[-1])
    for n in names:
        assert out["sources"][n]["accuracy"] == pytest.approx(rows[n]["accuracy"], abs=1e-6)
    # cross-domain: one source's test split alone, named with data.shards
    c = run_cli("evaluate", "--run", run, f"data.shards={sources[1]}")
    assert c.returncode == 0, c.stderr[-2000:]
    one = json.loads(c.stdout.splitlines()[-1])
    assert one["episodes"] == 12 and "sources" not in one

    # a test-only source (as Meta-Dataset's Traffic Signs) from a Meta-Dataset split file:
    # only its test split is written, and the run evaluates on it
    raw = variable_sources[1].parent / "raw_folder"
    folder = {
        "data.source": "folder",
        "data.image_size": 28,
        "data.channels": 1,
        "data.protocol": "alphabets",
        "data.variable.groups": "",
    }
    classes = sorted(p.name for p in (raw / "test").iterdir())
    split = tmp_path / "signs_splits.json"
    split.write_text(json.dumps({"train": [], "valid": [], "test": classes}))
    signs = tmp_path / "signs"
    listed = {"data.folder.split": "lists", "data.folder.split_dir": split}
    p = run_cli("prepare", *variable_source(raw / "test", signs, **folder, **listed))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "no classes in this split, not written" in p.stdout
    assert sorted(x.name for x in signs.iterdir() if x.is_dir()) == ["test"]
    c = run_cli("evaluate", "--run", run, f"data.shards={signs}")
    assert c.returncode == 0, c.stderr[-2000:]
    assert json.loads(c.stdout.splitlines()[-1])["episodes"] == 12

    # launched again after a source was prepared anew (other episodes): refused in one line
    again = variable_source(
        raw, sources[1], **folder, **{"data.folder.split": "folders", "data.seed": 1}
    )
    p = run_cli("prepare", *again, "--overwrite")
    assert p.returncode == 0, p.stderr[-2000:]
    record_before = (run / "sources.json").read_text()
    r = run_cli("train", *args, "train.steps=6")
    assert r.returncode == 2 and "folder (" in r.stderr, r.stderr[-2000:]
    assert "not the shards this run started on" in r.stderr
    assert (run / "sources.json").read_text() == record_before


def test_sources_that_do_not_mix_are_one_line_and_nothing_written(
    variable_sources, omniglot_dir, tmp_path
):
    # another image size
    big = tmp_path / "big"
    r = run_cli("prepare", *variable_source(omniglot_dir, big, **{"data.image_size": 32}))
    assert r.returncode == 0, r.stderr[-2000:]
    for extra, want in (
        ([big], "has images of shape [1, 32, 32]"),
        ([tmp_path / "missing"], "missing"),
    ):
        args = sources_overrides([*variable_sources, *extra], tmp_path)
        r = run_cli("train", *args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and want in r.stderr and len(lines) == 1, r.stderr[-2000:]
        assert not (tmp_path / "runs").exists()
    # weights that do not match the sources
    args = sources_overrides(variable_sources, tmp_path, **{"data.source_weights": "1,2,3"})
    r = run_cli("train", *args)
    assert r.returncode == 2 and "3 weight(s) for 2 data.sources" in r.stderr
    assert not (tmp_path / "runs").exists()
    # pre-training reads one source's classes
    args = sources_overrides(variable_sources, tmp_path, **{"algo.name": "pretrain"})
    r = run_cli("train", *args)
    assert r.returncode == 2 and "algo.name=pretrain" in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_variable_episodes_from_two_sources_are_bit_identical_at_1_2_4_processes_and_resume(
    variable_sources, tmp_path
):
    """Exact mode on padded, masked episodes of two sources, second-order MAML with a zero head:
    the same weights to the last bit at 1, 2 and 4 processes (each task's chunk is cut to its own
    episode, so its rounding does not depend on its neighbours), and across a 2 -> 4 resume."""
    from tests.conftest import launch, max_diff, weights

    args = sources_overrides(
        variable_sources,
        tmp_path,
        **{
            "algo.name": "maml",
            "algo.head_init": "zero",
            "algo.inner_steps": 1,
            "train.threads": 1,
            "train.steps": 8,
            "train.val_every": 4,
            "train.checkpoint_every": 100,
            "train.log_every": 4,
        },
    )
    runs = {}
    for n in (1, 2, 4):
        r = launch(n, args + [f"run.name=x{n}"])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[n] = tmp_path / "runs" / f"x{n}"
    metrics = {n: (runs[n] / "metrics.jsonl").read_text() for n in runs}
    for n in (2, 4):
        assert max_diff(weights(runs[1]), weights(runs[n])) == 0.0, n
        a, b = ([json.loads(x) for x in metrics[k].splitlines()] for k in (1, n))
        for x, y in zip(a, b, strict=True):
            # validation (each episode computed alike at any world size): equal; the training
            # sums are float32 all-reduces, in another order for another world size
            assert {k: v for k, v in x.items() if "val" in k} == {
                k: v for k, v in y.items() if "val" in k
            }
            for k in (k for k in x if k.startswith(("loss", "accuracy"))):
                assert y[k] == pytest.approx(x[k], rel=1e-5), (n, k)
    for n, upto in ((2, 4), (4, 8)):
        r = launch(n, args + ["run.name=hop", f"train.steps={upto}", "train.checkpoint_every=4"])
        assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(weights(runs[1]), weights(tmp_path / "runs" / "hop")) == 0.0
