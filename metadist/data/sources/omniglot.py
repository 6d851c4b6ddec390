"""Raw Omniglot (official zips or their extracted folders) -> uint8 images per character.

`locate()` finds the data (data.raw, $OMNIGLOT_DIR, data/raw/omniglot, else downloads the official
archives); `read_set()` reads one set; `make_splits()` is the documented train/val/test split;
`class_set()` is the source as metadist.data.sources.ClassSet. Preprocessing: 105x105 1-bit ->
inverted (strokes bright, 255, on a dark 0 background) -> metadist.data.sources.preprocess to
data.image_size (28 by default) -> (20, 1, size, size) uint8 per character. Deterministic.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metadist.data.sources import ClassSet, DataError, decode
from metadist.data.sources import preprocess as resize_images

SETS = ("images_background", "images_evaluation")
OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}.zip"
OFFICIAL_COUNTS = {"images_background": (30, 964), "images_evaluation": (20, 659)}
DRAWINGS = 20
SIZE = 28  # the default data.image_size
_ENTRY = re.compile(
    r"^(?P<set>images_\w+)/(?P<alphabet>[^/]+)/(?P<character>character\d+)/(?P<file>\d{4}_(?P<drawer>\d{2})\.png)$"
)


def _has_set(d: Path, name: str) -> bool:
    return (d / f"{name}.zip").is_file() or (d / name).is_dir()


def locate(raw: str = "", download: bool = True, log=print) -> Path:
    """The folder holding both sets, as zips or folders; downloads the official zips if none
    does."""
    if raw:
        d = Path(raw).expanduser()
        if not all(_has_set(d, s) for s in SETS):
            raise DataError(f"data.raw={raw}: expected {SETS[0]}(.zip) and {SETS[1]}(.zip) there")
        return d
    env = os.environ.get("OMNIGLOT_DIR")
    candidates = ([Path(env).expanduser()] if env else []) + [Path("data/raw/omniglot")]
    for d in candidates:
        if all(_has_set(d, s) for s in SETS):
            return d
    if not download:
        raise DataError(
            f"Omniglot not found in {', '.join(map(str, candidates))}; set data.raw or "
            "$OMNIGLOT_DIR"
        )
    d = candidates[-1]
    for s in SETS:
        if not _has_set(d, s):
            url = OFFICIAL_URL.format(s)
            log(f"Omniglot not found locally: downloading {url} -> {d}")
            tmp = d / f".{s}.zip.part"
            try:
                d.mkdir(parents=True, exist_ok=True)
                urllib.request.urlretrieve(url, tmp)
            except (OSError, ValueError) as e:  # URLError is an OSError
                tmp.unlink(missing_ok=True)
                reason = getattr(e, "reason", e)
                raise DataError(
                    f"Omniglot is not here and the download of {url} failed ({reason}): put "
                    f"{SETS[0]}.zip and {SETS[1]}.zip in {d} (or set data.raw or $OMNIGLOT_DIR)"
                ) from None
            tmp.rename(d / f"{s}.zip")
    return d


def preprocess(png: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """(n, 1, H, W) uint8 with strokes dark -> (n, 1, size, size) uint8 with strokes bright."""
    return resize_images(png, size, "stretch", invert=True)


@dataclass
class CharacterSet:
    """One Omniglot set: `images[i]` holds the 20 drawings of character `names[i]`."""

    name: str
    names: list[tuple[str, str]]  # (alphabet, characterNN), sorted
    images: np.ndarray  # (characters, 20, 1, size, size) uint8
    sha256: str  # of the preprocessed arrays (content, not container)


def _entries(root: Path, name: str) -> dict[str, callable]:
    """Relative path -> reader of its bytes, from `<name>.zip` or folder `<name>/`."""
    folder, archive = root / name, root / f"{name}.zip"
    if folder.is_dir():
        return {p.relative_to(root).as_posix(): p.read_bytes for p in sorted(folder.rglob("*.png"))}
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a readable zip ({e})") from None
    return {n: (lambda n=n: zf.read(n)) for n in sorted(zf.namelist()) if n.endswith(".png")}


def read_set(root: Path, name: str, size: int = SIZE) -> CharacterSet:
    """Read and preprocess one set, checking the official layout (20 drawings per character)."""
    entries = _entries(Path(root), name)
    chars: dict[tuple[str, str], dict[int, str]] = {}
    for path in entries:
        m = _ENTRY.match(path)
        if not m or m["set"] != name:
            raise DataError(
                f"{root}/{name}: unexpected entry {path!r}; expected "
                f"{name}/<Alphabet>/characterNN/NNNN_DD.png"
            )
        chars.setdefault((m["alphabet"], m["character"]), {})[int(m["drawer"])] = path
    if not chars:
        raise DataError(f"{root}/{name}: no images found")
    names = sorted(chars)
    images = np.empty((len(names), DRAWINGS, 1, size, size), np.uint8)
    for i, key in enumerate(names):
        drawers = chars[key]
        if sorted(drawers) != list(range(1, DRAWINGS + 1)):
            raise DataError(
                f"{root}/{name}/{key[0]}/{key[1]}: expected drawers 01..20, found {sorted(drawers)}"
            )
        pngs = [decode(drawers[d], 1, entries[drawers[d]]()) for d in range(1, DRAWINGS + 1)]
        images[i] = preprocess(torch.stack(pngs), size).numpy()
    alphabets = {a for a, _ in names}
    official = OFFICIAL_COUNTS.get(name)
    if official and len(alphabets) >= official[0] and (len(alphabets), len(names)) != official:
        raise DataError(
            f"{root}/{name}: {len(alphabets)} alphabets / {len(names)} characters, "
            f"official is {official[0]} / {official[1]}"
        )
    return CharacterSet(name, names, images, hashlib.sha256(images.tobytes()).hexdigest())


@dataclass
class Split:
    """The classes of one split: character indices into `pool` and the rotations (k*90 degrees)."""

    name: str
    chars: list[int]  # indices into the pooled character list
    rotations: tuple[int, ...]  # k in np.rot90(image, k) that make distinct classes


def pool(
    background: CharacterSet, evaluation: CharacterSet
) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """Both sets as one list of (set, alphabet, character) and one image array."""
    names = [(background.name, a, c) for a, c in background.names] + [
        (evaluation.name, a, c) for a, c in evaluation.names
    ]
    return names, np.concatenate([background.images, evaluation.images])


def _by_alphabet(names: list[tuple[str, str, str]], idx_bg: list[int], idx_ev: list[int]) -> dict:
    """Meta-Dataset's Omniglot split (make_splits, `metadataset`)."""
    alphabets: dict[str, list[int]] = {}
    for i in idx_bg:
        alphabets.setdefault(names[i][1], []).append(i)
    n_val = 5 if len(alphabets) == 30 else max(1, round(len(alphabets) * 5 / 30))
    smallest = sorted(alphabets, key=lambda a: (len(alphabets[a]), a))[:n_val]
    val = sorted(i for a in smallest for i in alphabets[a])
    return {"train": sorted(set(idx_bg) - set(val)), "val": val, "test": sorted(idx_ev)}


def make_splits(
    names: list[tuple[str, str, str]], protocol: str, seed: int, val_fraction: float = 0.2
) -> dict[str, Split]:
    """The documented splits over the pooled character list `names` (sorted within each set).

    alphabets: background characters permuted by numpy's default_rng(seed); the first
      round(val_fraction * n) are val, the rest train; all evaluation characters are test.
    characters: all characters permuted by default_rng(seed); 1100 train, 100 val, the rest test
      (423 on full Omniglot), each class also rotated by 90/180/270 degrees (the MAML paper).
      On a smaller set the counts scale as 1100:100:423.
    metadataset: Meta-Dataset's split by alphabet: the 5 smallest background alphabets (by
      characters, then name: Blackfoot, Ojibwe, Inuktitut, Tagalog, Alphabet of the Magi; 81
      characters) val, the other 25 train (883), the 20 evaluation alphabets test (659); on a
      smaller set 1 in 6 background alphabets (at least 1) go to val.
    """
    idx_bg = [i for i, n in enumerate(names) if n[0] == SETS[0]]
    idx_ev = [i for i, n in enumerate(names) if n[0] == SETS[1]]
    rng = np.random.default_rng(seed)
    if protocol == "alphabets":
        perm = [idx_bg[i] for i in rng.permutation(len(idx_bg))]
        n_val = max(1, round(val_fraction * len(perm)))
        parts = {"train": sorted(perm[n_val:]), "val": sorted(perm[:n_val]), "test": sorted(idx_ev)}
        rotations = (0,)
    elif protocol == "metadataset":
        parts, rotations = _by_alphabet(names, idx_bg, idx_ev), (0,)
    elif protocol == "characters":
        every = idx_bg + idx_ev
        perm = [every[i] for i in rng.permutation(len(every))]
        n = len(perm)
        n_train = 1100 if n == 1623 else round(n * 1100 / 1623)
        n_val = 100 if n == 1623 else max(1, round(n * 100 / 1623))
        parts = {
            "train": sorted(perm[:n_train]),
            "val": sorted(perm[n_train : n_train + n_val]),
            "test": sorted(perm[n_train + n_val :]),
        }
        rotations = (0, 1, 2, 3)
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    return {k: Split(k, v, rotations) for k, v in parts.items()}


def class_set(
    raw: str, protocol: str, seed: int, val_fraction: float, size: int = SIZE, log=print
) -> ClassSet:
    """Both sets, pooled (background first, each sorted), with the documented split of `protocol`:
    class names `<set>/<alphabet>/<character>` (the folders' relative paths)."""
    root = locate(raw, log=log)
    log(f"reading Omniglot from {root}")
    bg, ev = (read_set(root, s, size) for s in SETS)
    log(
        f"{bg.name}: {len({a for a, _ in bg.names})} alphabets, {len(bg.names)} characters; "
        f"{ev.name}: {len({a for a, _ in ev.names})} alphabets, {len(ev.names)} characters; "
        f"{DRAWINGS} drawings each"
    )
    names, images = pool(bg, ev)
    parts = make_splits(names, protocol, seed, val_fraction)
    return ClassSet(
        names=["/".join(n) for n in names],
        images=list(images),
        splits={k: list(v.chars) for k, v in parts.items()},
        rotations={k: v.rotations for k, v in parts.items()},
        source={
            "source": "omniglot",
            "root": str(root),
            "protocol": protocol,
            **{
                cs.name: {
                    "alphabets": len({a for a, _ in cs.names}),
                    "characters": len(cs.names),
                    "images": len(cs.names) * DRAWINGS,
                    "sha256": cs.sha256,
                }
                for cs in (bg, ev)
            },
        },
    )
