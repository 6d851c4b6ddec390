"""Small synthetic datasets, made where they are used (tests, benchmarks; nothing is downloaded):
`write_synthetic`, an Omniglot in the official layout (folders, optionally zips): each character a
fixed random pattern of strokes, its 20 drawings jittered, so it is learnable; and
`write_folder_dataset`, a grey or RGB dataset of any size in each layout of data.source=folder;
`random_batch`, a meta-batch of random images in the step's format (benchmarks and tests)."""

from __future__ import annotations

import itertools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from metadist.data.sources.omniglot import DRAWINGS, SETS


def random_batch(
    tasks: int,
    ways: int = 5,
    shots: int = 1,
    queries: int = 1,
    image: tuple = (1, 28, 28),
    seed: int = 0,
    dtype=None,
) -> dict[str, torch.Tensor]:
    """A meta-batch in the step's format: `tasks` tasks of `ways` classes, `shots` support and
    `queries` query images a class (class-major), each image uniform random of shape `image`
    (`dtype`: default torch's default) from the generator of `seed` (the support drawn first,
    then the query)."""
    g = torch.Generator().manual_seed(seed)

    def labels(n: int) -> torch.Tensor:
        return torch.arange(ways).repeat_interleave(n).expand(tasks, -1).contiguous()

    return {
        "x_support": torch.rand(tasks, ways * shots, *image, generator=g, dtype=dtype),
        "y_support": labels(shots),
        "x_query": torch.rand(tasks, ways * queries, *image, generator=g, dtype=dtype),
        "y_query": labels(queries),
    }


def write_synthetic(
    root: Path,
    alphabets=(("Alpha", "Beta", "Gamma", "Delta"), ("Omega", "Psi")),
    chars_per_alphabet: int = 6,
    side: int = 105,
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    gid = 1
    for set_name, names in zip(SETS, alphabets):
        for a in names:
            for c in range(1, chars_per_alphabet + 1):
                strokes = [tuple(int(v) for v in rng.integers(10, 95, size=4)) for _ in range(3)]
                d = Path(root) / set_name / a / f"character{c:02d}"
                d.mkdir(parents=True)
                for drawer in range(1, DRAWINGS + 1):
                    img = Image.new("L", (side, side), 255)
                    draw = ImageDraw.Draw(img)
                    dx, dy = rng.integers(-4, 5, size=2)
                    for x0, y0, x1, y1 in strokes:
                        draw.line([(x0 + dx, y0 + dy), (x1 + dx, y1 + dy)], fill=0, width=7)
                    img.convert("1").save(d / f"{gid:04d}_{drawer:02d}.png")
                gid += 1
    return Path(root)


def zip_sets(folder_root: Path, out: Path) -> Path:
    """The same sets as the official zips."""
    out.mkdir(parents=True, exist_ok=True)
    for s in SETS:
        with zipfile.ZipFile(out / f"{s}.zip", "w") as z:
            for p in sorted((folder_root / s).rglob("*")):
                z.write(p, p.relative_to(folder_root).as_posix())
    return out


LAYOUTS = ("fractions", "lists", "csv", "folders")


def _pattern_image(rng: np.random.Generator, base: list, size: int, channels: int) -> Image.Image:
    """One image of a class: the class's coloured shapes, shifted and recoloured a little, on a
    noisy background, at a size near `size` (sources vary in size; preprocessing resizes them)."""
    w, h = (int(size * f) for f in rng.uniform(0.8, 1.6, size=2))
    mode = "RGB" if channels == 3 else "L"
    bg = (
        tuple(int(v) for v in rng.integers(0, 60, size=3))
        if channels == 3
        else int(rng.integers(0, 60))
    )
    img = Image.new(mode, (w, h), bg)
    draw = ImageDraw.Draw(img)
    dx, dy = rng.integers(-w // 12, w // 12 + 1), rng.integers(-h // 12, h // 12 + 1)
    for kind, x0, y0, x1, y1, colour in base:
        box = [x0 * w + dx, y0 * h + dy, x1 * w + dx, y1 * h + dy]
        c = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in colour)
        fill = c if channels == 3 else int(np.mean(c))
        (draw.ellipse if kind else draw.rectangle)(
            [min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])],
            fill=fill,
        )
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=np.asarray(img).shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode)


@dataclass(frozen=True)
class FolderSpec:
    """A synthetic folder dataset: `classes` classes of `images` images each, near `size` px,
    grey (1) or RGB (3) `channels`, saved as `fmt`; `split_counts` classes for train, val, test."""

    classes: int = 15
    images: int = 6
    size: int = 84
    channels: int = 3
    fmt: str = "png"
    seed: int = 0
    split_counts: tuple = (9, 3, 3)


def write_folder_dataset(
    root: Path, layout: str = "fractions", spec: FolderSpec = FolderSpec()
) -> Path:
    """A small learnable dataset (FolderSpec) in one of the layouts data.source=folder reads
    (LAYOUTS): fractions: <root>/<class>/<image>; lists: the same and
    <root>/splits/{train,val,test}.txt; csv: <root>/images/<file> and <root>/{train,val,test}.csv
    (filename,label, mini-ImageNet's); folders: <root>/{train,val,test}/<class>/<image>. Class names
    look like WordNet ids (n0000k); `split_counts` classes go to train, val, test (fractions: all in
    one folder)."""
    rng = np.random.default_rng(spec.seed)
    root = Path(root)
    names = [f"n{k:08d}" for k in range(spec.classes)]
    split_of = {}
    bounds = np.cumsum([0, *spec.split_counts])
    for s, (a, b) in zip(("train", "val", "test"), itertools.pairwise(bounds)):
        for n in names[a:b]:
            split_of[n] = s
    rows = {"train": [], "val": [], "test": []}
    for n in names:
        for file in _write_class(root, layout, n, split_of.get(n, "train"), spec, rng):
            rows[split_of.get(n, "train")].append((file, n))
    if layout == "lists":
        (root / "splits").mkdir()
        for s in rows:
            (root / "splits" / f"{s}.txt").write_text(
                "".join(f"{n}\n" for n in names if split_of.get(n) == s)
            )
    if layout == "csv":
        for s, r in rows.items():
            (root / f"{s}.csv").write_text(
                "filename,label\n" + "".join(f"{f},{lab}\n" for f, lab in r)
            )
    return root


def _write_class(root: Path, layout: str, name: str, split: str, spec: FolderSpec, rng) -> list:
    """One class's images where `layout` puts them; returns their file names."""
    base = [
        (
            int(rng.integers(0, 2)),
            *rng.uniform(0, 1, size=4),
            tuple(int(v) for v in rng.integers(60, 256, size=3)),
        )
        for _ in range(4)
    ]
    files = []
    for i in range(spec.images):
        img = _pattern_image(rng, base, spec.size, spec.channels)
        file = f"{name}{i:08d}.{spec.fmt}"
        if layout == "csv":
            path = root / "images" / file
        elif layout == "folders":
            path = root / split / name / file
        else:
            path = root / name / file
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90) if spec.fmt == "jpg" else img.save(path)
        files.append(file)
    return files
