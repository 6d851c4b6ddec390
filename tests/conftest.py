"""Shared fixtures: a small synthetic Omniglot in the official layout (folders and zips), built in
tmp, with characters that are learnable (each a fixed random stroke pattern, drawings jittered),
and small configs pointing at it. Nothing is downloaded.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from metadist import config

REAL_OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
ROOT = Path(__file__).resolve().parents[1]


def _character(rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in rng.integers(10, 95, size=4)) for _ in range(3)]


def write_synthetic(root: Path, alphabets=(("Alpha", "Beta", "Gamma", "Delta"), ("Omega", "Psi")),
                    chars_per_alphabet: int = 6, side: int = 105, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    gid = 1
    for set_name, names in zip(("images_background", "images_evaluation"), alphabets):
        for a in names:
            for c in range(1, chars_per_alphabet + 1):
                strokes = _character(rng)
                d = root / set_name / a / f"character{c:02d}"
                d.mkdir(parents=True)
                for drawer in range(1, 21):
                    img = Image.new("L", (side, side), 255)
                    draw = ImageDraw.Draw(img)
                    dx, dy = rng.integers(-4, 5, size=2)
                    for x0, y0, x1, y1 in strokes:
                        draw.line([(x0 + dx, y0 + dy), (x1 + dx, y1 + dy)], fill=0, width=7)
                    img.convert("1").save(d / f"{gid:04d}_{drawer:02d}.png")
                gid += 1
    return root


def zip_sets(folder_root: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for s in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(out / f"{s}.zip", "w") as z:
            for p in sorted((folder_root / s).rglob("*")):
                z.write(p, p.relative_to(folder_root).as_posix())
    return out


@pytest.fixture(scope="session")
def omniglot_dir(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="session")
def omniglot_zips(tmp_path_factory, omniglot_dir) -> Path:
    return zip_sets(omniglot_dir, tmp_path_factory.mktemp("omniglot_zips"))


def small_overrides(raw: Path, tmp: Path, **extra) -> list[str]:
    base = {"data.raw": raw, "data.shards": tmp / "shards", "data.train_episodes": 96, "data.val_episodes": 16,
            "data.test_episodes": 24, "data.episodes_per_shard": 16, "run.root": tmp / "runs", "run.name": "t",
            "tracking.mode": "disabled", "model.hidden": 8, "train.meta_batch_size": 8, "train.steps": 4,
            "train.val_every": 2, "train.log_every": 1, "train.checkpoint_every": 2, "eval.tasks_per_batch": 8}
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
    prepare(cfg, log=lambda *a: None)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metadist", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=env)


def accelerate_bin() -> str:
    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.exists() else shutil.which("accelerate")
