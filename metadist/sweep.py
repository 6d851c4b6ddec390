"""`metadist sweep`: one config over seeds and a grid of overrides, as training runs, in one table.

A sweep file (YAML; every key but `config` optional) says what to run:

    config: configs/protonet.yaml      # the training config every member starts from
    overrides: [train.max_minutes=10]  # for every member
    seeds: [0, 1, 2]                   # the run's `seed` (initialisation, order, augmentation)
    grid:                              # every combination of these values, times every seed
      train.meta_lr: [0.001, 0.002]
    parallel: 1                        # members at once on this node, threads split between them
                                       # (default: 2 on 2+ cores, 1 when members have a time budget)

Member i is grid point i // len(seeds) with seed i % len(seeds): a training run in
<root>/<name>/<member> (root: `run.root`, default runs/sweeps; name: the file's stem), launched
as `metadist train` in a process of its own, W&B group <name>. A member whose summary.json is
written is finished and never run again; a member that was stopped resumes from its checkpoint,
so a killed sweep, launched again, goes on where it was. `--member i` runs member i alone (a
SLURM array's task, one member a node: launch/slurm/sweep.sbatch); `--table` writes the table
of the members finished so far.

The table (<root>/<name>/sweep.{md,csv,json}): each member's test accuracy (+- its test
tasks' 95% CI), best validation, steps, tasks seen and minutes; then per grid point the mean,
the standard deviation across seeds (n - 1) and the 95% interval of the mean across seeds
(Student's t), with the CPU-minutes spent.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metadist import locks
from metadist.config import ConfigError
from metadist.config import load as load_config
from metadist.errors import MetadistError

# Student's t, two-sided 95%, for 1..9 degrees of freedom; beyond, Cornish-Fisher's expansion
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def t95(df: int) -> float:
    if df <= len(T95):
        return T95[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


class SweepError(MetadistError):
    """A sweep file that cannot run, or a member that failed: the line names it."""


@dataclass(frozen=True)
class Member:
    index: int
    name: str  # its run folder's name
    point: tuple[str, ...]  # the grid point's overrides
    seed: int


@dataclass
class Sweep:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    grid: dict[str, list] = field(default_factory=dict)
    parallel: int = 0  # 0: auto_parallel
    root: Path = Path("runs/sweeps")

    @property
    def dir(self) -> Path:
        return self.root / self.name

    def points(self) -> list[tuple[str, ...]]:
        keys = list(self.grid)
        return [
            tuple(f"{k}={_value(v)}" for k, v in zip(keys, values))
            for values in itertools.product(*(self.grid[k] for k in keys))
        ]

    def members(self) -> list[Member]:
        out = []
        for point in self.points():
            for seed in self.seeds:
                slug = "_".join(point)
                name = f"{slug}_seed{seed}" if slug else f"seed{seed}"
                out.append(Member(len(out), name.replace("/", "-"), point, seed))
        return out

    def command(self, m: Member, threads: int = 0) -> list[str]:
        args = [
            "train",
            "--config",
            self.config,
            *self.overrides,
            *m.point,
            f"seed={m.seed}",
            f"run.root={self.dir}",
            f"run.name={m.name}",
            f"tracking.group={self.name}",
        ]
        if threads:
            args.append(f"train.threads={threads}")
        return [sys.executable, "-m", "metadist", *args]


def _value(v) -> str:
    """A YAML value as a command line's: lists comma-separated, booleans as true/false."""
    if isinstance(v, list):
        return ",".join(map(_value, v))
    return str(v).lower() if isinstance(v, bool) else str(v)


KEYS = ("name", "config", "overrides", "seeds", "grid", "parallel")


def read_file(path: Path, what: str, keys: tuple, error: type) -> dict:
    """A sweep or tune file's YAML mapping, its keys among `keys`; else one `error` line."""
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise error(f"{path}: cannot read the {what} file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected keys {', '.join(keys)}")
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise error(f"{path}: unknown key {unknown[0]!r} (a {what} file has {', '.join(keys)})")
    return d


def read(path, overrides=(), seeds=None, parallel=None) -> Sweep:
    """A sweep file, with the command line's seeds, parallelism and extra overrides; every
    member's config is checked before anything runs."""
    path = Path(path)
    d = read_file(path, "sweep", KEYS, SweepError)
    if "config" not in d:
        raise SweepError(f"{path}: no 'config' (the training config every member starts from)")
    grid = d.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{path}: grid maps each key to a non-empty list of values")
    s = Sweep(
        name=str(d.get("name") or path.stem),
        config=str(d["config"]),
        overrides=[*map(str, d.get("overrides") or []), *overrides],
        seeds=list(seeds if seeds is not None else d.get("seeds") or [0]),
        grid=grid,
        parallel=int(parallel or d.get("parallel") or 0),
    )
    if len(set(s.seeds)) != len(s.seeds) or not all(isinstance(x, int) for x in s.seeds):
        raise SweepError(f"{path}: seeds must be distinct integers (got {s.seeds})")
    if s.parallel < 0:
        raise SweepError(f"{path}: parallel must be at least 1, or 0 for auto (got {s.parallel})")
    root, budget = None, False
    for m in s.members():
        try:
            cfg = load_config(s.config, [*s.overrides, *m.point, f"seed={m.seed}"])
        except ConfigError as e:
            raise SweepError(f"member {m.name}: {e}") from None
        root, budget = root or cfg.run.root, budget or cfg.train.max_minutes > 0
    s.root = Path(root if root and root != "runs" else "runs/sweeps")
    s.parallel = s.parallel or auto_parallel(budget, len(s.members()))
    return s


def auto_parallel(budget: bool, members: int) -> int:
    """Members at once when the file does not say: two, one thread each, on a machine of two or
    more cores (measured on 2 cores: two 400-step members in 110 s at once against 146 s one
    after the other, 1.34x); one at a time when a member has a time budget (train.max_minutes),
    so each gets the whole machine and its steps are those of a run alone."""
    return 1 if budget or (os.cpu_count() or 1) < 2 else min(2, members)


def finished(s: Sweep, m: Member) -> dict | None:
    """The member's summary.json, once its run has finished."""
    p = s.dir / m.name / "summary.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


class Stop(Exception):
    """A signal stopped the sweep: its running members checkpointed."""


def run(s: Sweep, only: int | None = None, say=print) -> dict:
    """Run the sweep's unfinished members (or member `only`), `s.parallel` at a time, then write
    the table. A member that fails stops the sweep with its error; SIGTERM/SIGINT is passed to the
    running members, which checkpoint, and the sweep exits 75 (launch it again to go on)."""
    members = s.members()
    if only is not None:
        if not 0 <= only < len(members):
            raise SweepError(f"--member {only}: this sweep has members 0..{len(members) - 1}")
        members = [members[only]]
    todo = [m for m in members if finished(s, m) is None]
    s.dir.mkdir(parents=True, exist_ok=True)
    say(
        f"sweep {s.name}: {len(members)} members, {len(members) - len(todo)} finished, "
        f"{len(todo)} to run ({s.parallel} at a time) in {s.dir}"
    )
    threads = max(1, (os.cpu_count() or 1) // s.parallel) if s.parallel > 1 else 0
    with Children() as kids:
        while todo or kids.procs:
            while todo and len(kids.procs) < s.parallel and not kids.stopped:
                m = todo.pop(0)
                log = s.dir / f"{m.name}.log"
                say(f"member {m.index} {m.name}: running (log {log})")
                kids.procs[start(s.command(m, threads), s.dir, m.name, log, say)] = m
            if not kids.procs:
                break  # stopped before the next member started
            m, code = kids.wait_any()
            if code == 0 and (r := finished(s, m)):
                say(f"member {m.index} {m.name}: {_describe(r)}")
            elif not kids.stopped:
                kids.stop_all()
                raise SweepError(
                    f"member {m.name} failed (exit {code}): {_tail(s.dir / f'{m.name}.log')}"
                )
    table = write_table(s)
    if kids.stopped:
        raise Stop(f"sweep {s.name} stopped by a signal; launch it again to go on")
    return table


class Children:
    """The training runs this process started (`procs`: process -> what it is). While the
    with-block runs, SIGTERM or SIGINT to this process is passed on to each (they checkpoint and
    stop) and `stopped` is set; the handlers before are put back at its end."""

    def __init__(self):
        self.procs: dict[subprocess.Popen, object] = {}
        self.stopped = False

    def __enter__(self) -> Children:
        self.old = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _stop(self, _signum, _frame) -> None:
        self.stopped = True
        for p in self.procs:
            p.send_signal(signal.SIGTERM)

    def stop_all(self) -> None:
        """SIGTERM to every running one, and wait for each to checkpoint and end."""
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait()

    def wait_any(self) -> tuple[object, int]:
        """The first to end (removed from `procs`) and its exit status."""
        while True:
            for p in list(self.procs):
                if p.poll() is not None:
                    return self.procs.pop(p), p.returncode
            time.sleep(0.1)


def start(cmd: list[str], root: Path, name: str, log: Path, say) -> subprocess.Popen:
    """The training run <root>/<name> in a process of its own, its output appended to `log`. It
    gets SIGTERM (checkpoint and stop) if this process dies, so a killed sweep leaves no run
    behind; a launch still in that folder (one such run finishing its checkpoint) is waited for."""
    locks.take(root / f".{name}.lock", f"run folder {root / name}", say=say).release()
    with open(log, "a") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _tail(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {log}"
    return f"{lines[-1] if lines else 'no output'} (log {log})"


def _describe(r: dict) -> str:
    acc = r.get("test_accuracy")
    test = f"test {acc:.4f} +- {r['test_ci95']:.4f}" if acc is not None else "no test"
    return f"{test}, best val {r['best_val_accuracy']:.4f}, {r['steps']} steps, " + (
        f"{r['wall_time_s'] / 60:.1f} min"
    )


def stats(values: list[float]) -> dict:
    """Mean, standard deviation (n - 1) and the 95% interval of the mean (Student's t)."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    ci = t95(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "ci95": ci}


def write_table(s: Sweep) -> dict:
    """sweep.json, sweep.csv and sweep.md of the members finished so far."""
    rows, groups = [], []
    for point in s.points():
        accs, minutes = [], 0.0
        for m in s.members():
            if m.point != point or (r := finished(s, m)) is None:
                continue
            threads = r.get("threads") or 1
            row = {
                "member": m.name,
                "point": " ".join(point),
                "seed": m.seed,
                "test_accuracy": r.get("test_accuracy"),
                "test_ci95": r.get("test_ci95"),
                "test_episodes": r.get("test_episodes"),
                "best_val_accuracy": r.get("best_val_accuracy"),
                "steps": r.get("steps"),
                "tasks_seen": r.get("tasks_seen"),
                "minutes": r["wall_time_s"] / 60,
                "cpu_minutes": r["wall_time_s"] / 60 * threads * r.get("world_size", 1),
            }
            rows.append(row)
            minutes += row["cpu_minutes"]
            if row["test_accuracy"] is not None:
                accs.append(row["test_accuracy"])
        groups.append({"point": " ".join(point) or "(base)", **stats(accs), "cpu_minutes": minutes})
    out = {
        "sweep": s.name,
        "config": s.config,
        "overrides": s.overrides,
        "members": rows,
        "groups": groups,
    }
    (s.dir / "sweep.json").write_text(json.dumps(out, indent=1) + "\n")
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (s.dir / "sweep.csv").write_text(buf.getvalue())
    (s.dir / "sweep.md").write_text(markdown(out))
    return out


def markdown(table: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [
        f"# sweep {table['sweep']}: {table['config']} {' '.join(table['overrides'])}".rstrip(),
        "",
        "| grid point | seeds | test accuracy (%) mean | std | 95% interval (seeds) | CPU-min |",
        "|---|---|---|---|---|---|",
    ]
    for g in table["groups"]:
        ci = "-" if g["ci95"] is None else f"+- {100 * g['ci95']:.2f}"
        std = "-" if g["n"] < 2 else f"{100 * g['std']:.2f}"
        mean = pct(g["mean"] if g["n"] else None)
        lines.append(
            f"| {g['point']} | {g['n']} | {mean} | {std} | {ci} | {g['cpu_minutes']:.1f} |"
        )
    lines += [
        "",
        "| member | seed | test accuracy (%) | test 95% CI | best val | steps | tasks seen | min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table["members"]:
        lines.append(
            f"| {r['member']} | {r['seed']} | {pct(r['test_accuracy'])} | "
            f"{pct(r['test_ci95'])} | {pct(r['best_val_accuracy'])} | {r['steps']} | "
            f"{r['tasks_seen']} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines) + "\n"
