"""Your own few-shot dataset: a root of class folders (or the standard split files) -> uint8 images
per class and the train/val/test class lists.

Layouts (`data.folder.split`, a table of readers: LAYOUTS):
  fractions  <root>/<class>/<image>; classes split by `data.folder.test_fraction` and
  `data.val_fraction`
             with numpy's default_rng(data.seed) (test first, then val, the rest train)
  lists      <root>/<class>/<image> and <split_dir>/{train,val,test}.txt, one class per line (as
             CIFAR-FS and CUB splits are distributed; blank lines and # comments skipped); or
             split_dir a Meta-Dataset split file, <source>_splits.json (train, valid, test lists)
  csv        <root>/<filename> and <split_dir>/{train,val,test}.csv with the columns filename,label
             (Ravi & Larochelle's mini-ImageNet split: every image in one folder)
  folders    <root>/{train,val,test}/<class>/<image> (FC100 style)
A class is a folder `data.folder.class_depth` levels below its root (Omniglot's
<alphabet>/<character> is depth 2 under each of its sets, depth 3 under the folder holding both);
its images are the files in it that PIL reads (by extension; other files are ignored), sorted by
name. Classes are ordered by their path components. Every image goes through
metadist.data.sources.preprocess: per class (n, C, image_size, image_size) uint8. Decoding runs in
worker processes (up to 8, spawned).
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from metadist.data.sources import SPLITS, ClassSet, DataError, decode, preprocess

IMAGE_EXTENSIONS = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
}


def load_class(paths: list[str], channels: int, size: int, resize: str, invert: bool) -> np.ndarray:
    """The images of one class -> (n, C, size, size) uint8 (one image at a time: sizes may
    differ)."""
    out = np.empty((len(paths), channels, size, size), np.uint8)
    for i, p in enumerate(paths):
        out[i] = preprocess(decode(p, channels).unsqueeze(0), size, resize, invert)[0].numpy()
    return out


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def scan_classes(root: Path, depth: int) -> dict[str, list[str]]:
    """class name (relative path of `depth` folders) -> its image files, sorted."""
    if not root.is_dir():
        raise DataError(f"data.raw={root}: not a folder")
    found: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        if len(rel.parts) == depth:
            images = sorted(f for f in filenames if _is_image(Path(f)))
            if images:
                found[rel.as_posix()] = [str(Path(dirpath) / f) for f in images]
            dirnames[:] = []  # a class's subfolders are not classes
    if not found:
        raise DataError(
            f"data.raw={root}: no class folders with images {depth} level(s) down "
            f"(data.folder.class_depth={depth}; images are {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return found


def class_order(name: str) -> tuple:
    return tuple(name.split("/"))


def _read_lists(split_dir: Path, depth: int) -> dict[str, list[str]]:
    if split_dir.suffix == ".json":
        return _read_split_json(split_dir, depth)
    out = {}
    for split in SPLITS:
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            raise DataError(
                f"data.folder.split=lists: {path} is missing (one class per line, for each of "
                "train, val, test)"
            )
        names = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip().strip("/")
            if line and not line.startswith("#"):
                if len(line.split("/")) != depth:
                    raise DataError(
                        f"{path}:{n}: class {line!r} is not {depth} folder(s) deep "
                        f"(data.folder.class_depth={depth})"
                    )
                names.append(line)
        out[split] = names
    return out


def _read_split_json(path: Path, depth: int) -> dict[str, list[str]]:
    """Meta-Dataset's split files (dataset_conversion/splits/<source>_splits.json): {"train":
    [classes], "valid": [...], "test": [...]}; a split may be empty (a test-only source)."""
    import json

    if not path.is_file():
        raise DataError(f"data.folder.split_dir={path}: no such split file")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a JSON split file ({e})") from None
    keys = {"train": "train", "val": "valid" if "valid" in table else "val", "test": "test"}
    out = {}
    for split, key in keys.items():
        names = table.get(key) if isinstance(table, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: expected a list of class names under {key!r}")
        bad = [n for n in names if len(n.strip("/").split("/")) != depth]
        if bad:
            raise DataError(
                f"{path}: class {bad[0]!r} is not {depth} folder(s) deep "
                f"(data.folder.class_depth={depth})"
            )
        out[split] = [n.strip("/") for n in names]
    return out


def _read_csvs(root: Path, split_dir: Path) -> dict[str, dict[str, list[str]]]:
    out = {}
    for split in SPLITS:
        path = split_dir / f"{split}.csv"
        if not path.is_file():
            raise DataError(
                f"data.folder.split=csv: {path} is missing (columns filename,label, for each of "
                "train, val, test)"
            )
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in reader.fieldnames or []]
            if "filename" not in cols or "label" not in cols:
                raise DataError(
                    f"{path}: expected the columns filename,label (Ravi & Larochelle's split), "
                    f"found {cols}"
                )
            classes: dict[str, list[str]] = {}
            for n, row in enumerate(reader, 2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                if not row["filename"] or not row["label"]:
                    raise DataError(f"{path}:{n}: empty filename or label")
                image = root / row["filename"]
                if not image.is_file():
                    raise DataError(
                        f"{path}:{n}: image {image} does not exist (data.raw is the folder of the "
                        "images)"
                    )
                classes.setdefault(row["label"], []).append(str(image))
        out[split] = {k: sorted(v) for k, v in classes.items()}
    return out


def _check_disjoint(splits: dict[str, list[str]], where: str) -> None:
    seen: dict[str, str] = {}
    for split in SPLITS:
        for c in splits[split]:
            if c in seen and seen[c] != split:
                raise DataError(
                    f"{where}: class {c!r} is in both {seen[c]} and {split}; a class belongs to "
                    "one split"
                )
            if c in seen:
                raise DataError(f"{where}: class {c!r} is listed twice in {split}")
            seen[c] = split


def _layout_fractions(root: Path, sdir: Path, f, seed: int, val_fraction: float, log):
    paths = scan_classes(root, f.class_depth)
    names = sorted(paths, key=class_order)
    perm = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_test, n_val = round(f.test_fraction * len(names)), round(val_fraction * len(names))
    parts = {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val :],
    }
    return paths, {s: sorted(v, key=class_order) for s, v in parts.items()}


def _layout_lists(root: Path, sdir: Path, f, seed: int, val_fraction: float, log):
    paths = scan_classes(root, f.class_depth)
    parts = _read_lists(sdir, f.class_depth)
    _check_disjoint(parts, f"the class lists in {sdir}")
    for s in SPLITS:
        for c in parts[s]:
            if c not in paths:
                where = sdir if sdir.suffix == ".json" else sdir / (s + ".txt")
                raise DataError(
                    f"{where}: class {c!r} does not exist under {root} "
                    f"(no folder with images there)"
                )
        parts[s] = sorted(parts[s], key=class_order)
    unused = len(paths) - sum(len(v) for v in parts.values())
    if unused:
        log(f"{root}: {unused} class folder(s) in no split list, left out")
    return paths, parts


def _layout_csv(root: Path, sdir: Path, f, seed: int, val_fraction: float, log):
    by_split = _read_csvs(root, sdir)
    parts = {s: sorted(by_split[s], key=class_order) for s in SPLITS}
    _check_disjoint(parts, f"the CSVs in {sdir}")
    paths: dict[str, list[str]] = {}
    for s in SPLITS:
        paths.update(by_split[s])
    return paths, parts


def _layout_folders(root: Path, sdir: Path, f, seed: int, val_fraction: float, log):
    paths: dict[str, list[str]] = {}
    parts = {}
    for s in SPLITS:
        if not (root / s).is_dir():
            raise DataError(
                f"data.folder.split=folders: {root / s} is missing (expected train/, val/ and "
                "test/ "
                f"under {root})"
            )
        found = scan_classes(root / s, f.class_depth)
        parts[s] = sorted(found, key=class_order)
        for c in found:
            if c in paths:
                raise DataError(
                    f"{root}: class {c!r} is in more than one of train/, val/, test/; "
                    "a class belongs to one split"
                )
        paths.update(found)
    return paths, parts


# data.folder.split -> reader(root, split_dir, folder settings, data seed, val fraction, log) ->
# (class -> its image files, split -> its classes)
LAYOUTS = {
    "fractions": _layout_fractions,
    "lists": _layout_lists,
    "csv": _layout_csv,
    "folders": _layout_folders,
}


def _keep_large_enough(
    paths: dict, parts: dict, need: tuple, f, root: Path, log, empty_ok=False
) -> dict:
    """Each split's classes with at least need[0] images (need[1] says why; f.small_classes=skip:
    the others left out, counted). A split the layout (f.split) leaves empty is an error, unless
    `empty_ok`."""
    small, layout = f.small_classes, f.split
    need, why = need
    for s in SPLITS:
        if not parts[s] and empty_ok:
            continue
        kept = []
        for c in parts[s]:
            if len(paths[c]) < need:
                if small == "skip":
                    continue
                raise DataError(
                    f"class {c!r} ({s}) has {len(paths[c])} images, an episode needs {why} = "
                    f"{need}; remove it, set data.folder.small_classes=skip"
                    + (", or lower data.queries" if why.startswith("shots") else "")
                )
            kept.append(c)
        if len(kept) < len(parts[s]):
            log(
                f"{s}: {len(parts[s]) - len(kept)} class(es) with fewer than {need} images left "
                "out "
                "(data.folder.small_classes=skip)"
            )
        parts[s] = kept
        if not kept:
            raise DataError(
                f"data.raw={root}: the {s} split has no classes (data.folder.split={layout})"
            )
    return parts


def read_classes(d, need: int, log=print, workers: int = 0, empty_ok: bool = False) -> ClassSet:
    """The dataset of data section `d` (data.raw in layout data.folder.split), preprocessed: every
    class with at least `need` images (shots + queries); fewer is an error naming the class, or
    (data.folder.small_classes=skip) the class is left out and counted. empty_ok: a split the
    layout leaves without classes is kept empty (Meta-Dataset's test-only sources)."""
    f = d.folder
    root = Path(d.raw).expanduser()
    if not d.raw or not root.is_dir():
        raise DataError(
            f"data.raw={d.raw!r}: the dataset's root folder does not exist (data.source=folder)"
        )
    if f.split not in LAYOUTS:
        raise DataError(f"data.folder.split={f.split!r}: allowed values are {', '.join(LAYOUTS)}")
    sdir = Path(f.split_dir).expanduser() if f.split_dir else root
    paths, parts = LAYOUTS[f.split](root, sdir, f, d.seed, d.val_fraction, log)
    why = "a support and a query image" if d.episode == "variable" else "shots + queries"
    parts = _keep_large_enough(paths, parts, (need, why), f, root, log, empty_ok)
    names = [c for s in SPLITS for c in parts[s]]
    images = _decode_all(
        [(paths[c], d.channels, d.image_size, f.resize, f.invert) for c in names], workers
    )
    index = {c: i for i, c in enumerate(names)}
    return ClassSet(
        names=names,
        images=images,
        splits={s: [index[c] for c in parts[s]] for s in SPLITS},
        rotations=dict.fromkeys(SPLITS, (0,)),
        source={
            "source": "folder",
            "root": str(root),
            "split": f.split,
            "classes": len(names),
            "images": sum(len(x) for x in images),
        },
    )


def _decode_all(jobs: list, workers: int = 0) -> list[np.ndarray]:
    """Every class's images decoded and preprocessed, in worker processes (up to 8, spawned) from a
    few thousand images on (each worker starts by importing torch)."""
    workers = workers or (
        min(8, os.cpu_count() or 1) if sum(len(j[0]) for j in jobs) >= 2000 else 1
    )
    if workers <= 1 or len(jobs) <= 1:
        return [_load_job(j) for j in jobs]
    # spawn, not fork: a process forked after torch started its OpenMP threads can hang in them
    import multiprocessing

    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread
    ) as pool:
        return list(pool.map(_load_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


def _load_job(job) -> np.ndarray:
    return load_class(*job)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # the pool's processes share the cores
