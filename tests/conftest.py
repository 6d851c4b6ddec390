"""Shared fixtures: a small synthetic Omniglot in the official layout (folders and zips, from
metadist.data.synthetic), built in tmp, and small configs pointing at it. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metadist import config
from metadist.data.synthetic import write_synthetic, zip_sets
from metadist.distributed import accelerate_launch, free_port
from tests import zygote

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each (and every process it starts) computes on one
    # thread, or the workers' thread pools fight over the cores
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# the slow suite's longest files first, so that its two workers finish together (pytest-xdist's
# --dist loadfile hands the files out in this order)
LONGEST_FIRST = ("test_distributed.py", "test_pool.py", "test_compiled.py", "test_folder.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="session")
def strategy_cache(tmp_path_factory):
    """algo.strategy=auto's per-machine cache in a folder of this session (inherited by every
    process the tests start), never the user's ~/.cache/metadist."""
    folder = tmp_path_factory.mktemp("metadist-cache")
    old = os.environ.get("METADIST_CACHE_DIR")
    os.environ["METADIST_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("METADIST_CACHE_DIR", None)
    else:
        os.environ["METADIST_CACHE_DIR"] = old


REAL_OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def float64():
    """torch's default dtype float64 for one test (exactness checks against references)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def omniglot_dir(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="session")
def omniglot_zips(tmp_path_factory, omniglot_dir) -> Path:
    return zip_sets(omniglot_dir, tmp_path_factory.mktemp("omniglot_zips"))


def folder_args(root, tmp, layout="fractions", size=84, channels=3, **extra):
    """Overrides for a small folder dataset made by write_folder_dataset(root, layout)."""
    base = {
        "data.source": "folder",
        "data.raw": root / "images" if layout == "csv" else root,
        "data.folder.split": layout,
        "data.image_size": size,
        "data.channels": channels,
        "data.ways": 3,
        "data.shots": 1,
        "data.queries": 2,
        "data.shards": tmp / "shards",
        "data.train_episodes": 24,
        "data.val_episodes": 6,
        "data.test_episodes": 6,
        "data.episodes_per_shard": 8,
        "run.root": tmp / "runs",
        "run.name": "t",
        "tracking.mode": "disabled",
        "model.hidden": 8,
        "train.meta_batch_size": 4,
        "train.steps": 3,
        "train.val_every": 3,
        "train.log_every": 1,
        "train.checkpoint_every": 3,
        "eval.tasks_per_batch": 4,
        "algo.strategy": "batched",
    }
    if layout == "lists":
        base["data.folder.split_dir"] = root / "splits"
    if layout == "csv":
        base["data.folder.split_dir"] = root
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def model_for(cfg: config.Config, image_shape=None):
    """The model `cfg` describes, for its data.channels and data.image_size (or `image_shape`)."""
    from metadist.algorithms import get, model_of

    d = cfg.data
    rows = get(cfg.algo).head_rows(cfg.algo, d.ways, 0)
    return model_of(
        cfg.model, cfg.algo, image_shape or (d.channels, d.image_size, d.image_size), rows
    )


def small_overrides(raw: Path, tmp: Path, **extra) -> list[str]:
    base = {
        "data.raw": raw,
        "data.shards": tmp / "shards",
        "data.train_episodes": 96,
        "data.val_episodes": 16,
        "data.test_episodes": 24,
        "data.episodes_per_shard": 16,
        "run.root": tmp / "runs",
        "run.name": "t",
        "tracking.mode": "disabled",
        "model.hidden": 8,
        "train.meta_batch_size": 8,
        "train.steps": 4,
        "train.val_every": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "eval.tasks_per_batch": 8,
        # fixed: auto measures the CPU, and runs compared bit for bit must agree
        "algo.strategy": "batched",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def small_cfg(omniglot_dir, tmp_path):
    def make(**extra) -> config.Config:
        return config.load(None, small_overrides(omniglot_dir, tmp_path, **extra))

    return make


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, omniglot_dir):
    """Shards of the synthetic set (alphabets protocol), prepared once per session."""
    from metadist.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("prepared")
    cfg = config.load(None, small_overrides(omniglot_dir, tmp))
    prepare(cfg.data, log=lambda *a: None)
    return cfg


def copy_prepared(prepared: config.Config, tmp: Path) -> Path:
    """A copy of the session's prepared shards (to damage or serve): the shards root."""
    from metadist.data.prepare import shards_dir

    dst = tmp / "shards"
    shutil.copytree(shards_dir(prepared.data), dst)
    return dst


def run_cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`python -m metadist *args`, waited for (forked from a process that has imported torch where
    that is the same as a fresh interpreter: tests/zygote.py)."""
    return zygote.run(args, cwd=cwd, env=env, timeout=timeout)


def launch_cmd(nproc: int, args, port=None, machines=1, machine_rank=0) -> list[str]:
    """The command of `metadist train` with `nproc` processes: a plain process for one, else
    `accelerate launch` on this machine (or node `machine_rank` of `machines`, on loopback)."""
    if nproc == 1 and machines == 1:
        return [sys.executable, "-m", "metadist", "train", *map(str, args)]
    cmd = [
        *accelerate_launch(),
        "--multi_gpu",
        "--num_processes",
        str(nproc),
        "--num_machines",
        str(machines),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port or free_port()),
    ]
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return cmd + ["-m", "metadist", "train", *map(str, args)]


def launch(nproc, args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`metadist train` with `nproc` processes (accelerate launch, gloo), waited for. Every test
    asserts a launch that should succeed exits 0: a rank that ran collectives leaves without the
    interpreter's shutdown (distributed.leave), where before about 1 launch in 45 aborted after a
    complete run."""
    if nproc == 1:
        return zygote.run(["train", *args], env=dict(os.environ, **(env or {})), timeout=timeout)
    r = subprocess.run(
        launch_cmd(nproc, args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )
    return r


def weights(run_dir: Path) -> dict:
    """A run's final weights."""
    return _load_weights(run_dir / "model.safetensors")[0]


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two sets of weights."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _load_weights(path):
    from metadist.checkpoint import load_weights

    return load_weights(path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, omniglot_dir):
    tmp = tmp_path_factory.mktemp("trained")
    args = small_overrides(omniglot_dir, tmp, **{"train.steps": 6, "train.val_every": 3})
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, args, r


@pytest.fixture
def http_server():
    """`python -m http.server` on 127.0.0.1 and a free port, serving a folder; stopped afterwards.
    Yields start(folder, log=None) -> base URL; with `log`, the server's request log (one line per
    request, `"GET /path HTTP/1.1" 200`) goes to that file."""
    import time
    import urllib.request

    procs = []

    def start(folder: Path, log: Path | None = None) -> str:
        port = free_port()
        err = open(log, "a") if log else subprocess.DEVNULL
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                    str(folder),
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                return url
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("http.server did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait()


VARIABLE = {
    "data.episode": "variable",
    "data.train_episodes": 48,
    "data.val_episodes": 8,
    "data.test_episodes": 12,
    "data.episodes_per_shard": 16,
    "data.variable.max_ways": 8,
    "data.variable.max_support": 40,
}


def variable_source(raw: Path, out: Path, **extra) -> list[str]:
    """Overrides preparing variable episodes (small constants) of `raw` into `out`: the synthetic
    Omniglot (Meta-Dataset's protocol, an alphabet an episode) unless `extra` says otherwise."""
    base = {
        **VARIABLE,
        "data.raw": raw,
        "data.protocol": "metadataset",
        "data.variable.groups": "parent",
        "data.shards": out,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def variable_sources(tmp_path_factory, omniglot_dir) -> tuple[Path, Path]:
    """Two sources of variable episodes, prepared once per session: the synthetic Omniglot by
    alphabet, and a grey 28x28 folder dataset of 24 classes (8 images each)."""
    from metadist.data.prepare import prepare
    from metadist.data.synthetic import FolderSpec, write_folder_dataset

    tmp = tmp_path_factory.mktemp("variable_sources")
    quiet = dict(log=lambda *a: None)
    omni = tmp / "omniglot"
    prepare(config.load(None, variable_source(omniglot_dir, omni)).data, **quiet)
    spec = FolderSpec(classes=24, images=8, size=28, channels=1, split_counts=(12, 6, 6))
    raw = write_folder_dataset(tmp / "raw_folder", "folders", spec)
    folder = tmp / "folder"
    extra = {
        "data.source": "folder",
        "data.folder.split": "folders",
        "data.image_size": 28,
        "data.channels": 1,
        "data.protocol": "alphabets",
        "data.variable.groups": "",
    }
    prepare(config.load(None, variable_source(raw, folder, **extra)).data, **quiet)
    return omni, folder


def sources_overrides(sources, tmp: Path, **extra) -> list[str]:
    """A small protonet run on `sources` (data.sources)."""
    base = {
        "data.sources": ",".join(map(str, sources)),
        "data.episode": "variable",
        "algo.name": "protonet",
        "run.root": tmp / "runs",
        "run.name": "t",
        "tracking.mode": "disabled",
        "model.hidden": 8,
        "train.meta_batch_size": 8,
        "train.steps": 4,
        "train.val_every": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "eval.tasks_per_batch": 8,
        "eval.episodes_per_source": 10,
        "algo.strategy": "batched",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
