"""A small synthetic Omniglot in the official layout (folders, optionally zips): each character a
fixed random pattern of strokes, its 20 drawings jittered, so it is learnable. Tests and
benchmarks use it where the real data set is not needed; nothing is downloaded."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from metadist.data.omniglot import DRAWINGS, SETS


def write_synthetic(root: Path, alphabets=(("Alpha", "Beta", "Gamma", "Delta"), ("Omega", "Psi")),
                    chars_per_alphabet: int = 6, side: int = 105, seed: int = 0) -> Path:
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
