"""Small trained learners shipped with metadist, taken by name where a run is expected:
`metadist.load("protonet")`, `metadist demo --run boss`, `metadist predict --run protonet ...`.

Each is a run folder as training writes it, kept small: best.safetensors (Conv4 on Omniglot,
about 450 kB), summary.json (its test accuracy, steps, time), metrics.jsonl (its curves),
config.yaml, and COMMAND (the command that made it; `make learners` runs them all). A folder or
file of that name in the working directory comes first: a name is looked up here only when no
such path exists.

`make learners` trains each on the Omniglot shards of its config (a fixed step count, no time
budget, W&B off), so the same command on the same machine gives the same bits, and copies the
run's files here (`python -m metadist.learners runs/learners/NAME ...`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).parent
FILES = ("best.safetensors", "summary.json", "metrics.jsonl", "config.yaml")


def names() -> list[str]:
    """The shipped learners' names."""
    return sorted(p.name for p in HERE.iterdir() if (p / "best.safetensors").is_file())


def resolve(path) -> Path:
    """`path` as given when it exists, else the shipped learner of that name, else `path` (whose
    absence the caller reports)."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    shipped = HERE / p.name
    return shipped if (shipped / "best.safetensors").is_file() else p


def ship(run: Path, command: str) -> Path:
    """Copy a finished run's files into the package as the learner named after its folder."""
    run = Path(run)
    missing = [f for f in FILES if not (run / f).is_file()]
    if missing:
        raise SystemExit(f"{run}: no {missing[0]} (has this run finished?)")
    out = HERE / run.name
    out.mkdir(exist_ok=True)
    for f in FILES:
        shutil.copyfile(run / f, out / f)
    (out / "COMMAND").write_text(command.strip() + "\n")
    return out
