"""Where shard bytes come from (metadist/data/store.py): a real HTTP server on 127.0.0.1, with and
without a cache folder; its faults stopping the run naming the URL."""

import pytest
import torch

from metadist.data.prepare import shards_dir
from metadist.data.store import ShardError
from metadist.data.stream import EpisodeSource
from tests.conftest import copy_prepared, free_port, run_cli, small_overrides


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
    # every shard (3 pools; train, val, test), cached once
    assert len(list((tmp_path / "cache").iterdir())) == 3 + 6 + 1 + 2
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
