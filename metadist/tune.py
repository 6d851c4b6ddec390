"""`metadist tune`: a hyperparameter search on Optuna, each trial a training run on a budget.

A tune file (YAML) says what to search:

    config: configs/protonet.yaml       # every trial starts from this training config
    overrides: [train.max_minutes=3]    # for every trial: its budget, ...
    trials: 20                          # trials in the study, finished or pruned, all workers
    space:                              # the search space, one entry per config key
      train.meta_lr: {low: 0.0005, high: 0.005, log: true}   # a float (log scale)
      algo.inner_steps: {low: 1, high: 5}                     # an int (both bounds ints)
      data.task_aug: {choices: [0.0, 0.2, 0.4]}               # one of these
    enqueue: [{train.meta_lr: 0.002}]   # trials to run first (e.g. the recipe as it is)
    pruner: {startup_trials: 3, warmup_validations: 1, by: step}   # the median pruner
    storage: ""                         # any database URL Optuna takes; "" -> SQLite in the root
    seed: 0                             # the sampler's (TPE)

The study (name: the file's stem) lives in <root>/<name>/study.db (root: `run.root`, default
runs/tune) or at `storage`, so workers on many nodes share one study: launch the same command on
each. Trial k is a training run <root>/<name>/trials/trialNNNN in a process of its own, with
`eval.test=false`: the search reads validation accuracy only (the objective is the run's best
validation accuracy), and the test split is read once, by the recipe that comes out. Each
validation is reported to Optuna as it is written (metrics.jsonl); a trial whose curve trails the
median of the trials before it at the same step is pruned: its run gets SIGTERM, checkpoints and
stops. `by: time` compares curves at equal training time instead (its best validation so far
against the median of the others' best by that time), for a space whose steps differ in cost (the
meta-batch, the episode's ways): at equal steps a trial of cheap steps would trail one of costly
ones that had done several times its work. Time-keyed pruning depends on the machine's speed;
`step`, the default, does not. A killed search, launched again, goes on: a trial that was running
in a process that is gone (this host: its pid; any host: Optuna's heartbeat) is marked failed and
retried with the same values in the same run folder, which resumes from its checkpoint. At the end
(and after each trial) the best trial is written as a training config, <root>/<name>/best.yaml.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metadist import locks
from metadist.config import ConfigError
from metadist.config import load as load_config
from metadist.errors import MetadistError, Preempted
from metadist.sweep import Children, read_file, start

KEYS = ("name", "config", "overrides", "trials", "space", "enqueue", "pruner", "storage", "seed")


class TuneError(MetadistError):
    """A tune file that cannot run, or a search that cannot go on: the line names it."""


class Stopped(Preempted):
    """A signal stopped the search; its running trial checkpointed (exit 75)."""


@dataclass
class Tune:
    name: str
    config: str
    space: dict
    overrides: list[str] = field(default_factory=list)
    trials: int = 20
    enqueue: list[dict] = field(default_factory=list)
    pruner: dict = field(default_factory=dict)
    storage: str = ""
    seed: int = 0
    root: Path = Path("runs/tune")
    val_every: int = 250  # the trials' train.val_every (the pruner's warm-up is in validations)

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def url(self) -> str:
        return self.storage or f"sqlite:///{(self.dir / 'study.db').resolve()}"

    def command(self, params: dict, run: str) -> list[str]:
        args = [
            "train",
            "--config",
            self.config,
            *self.overrides,
            *(f"{k}={_value(v)}" for k, v in params.items()),
            f"run.root={self.dir / 'trials'}",
            f"run.name={run}",
            "eval.test=false",
            f"tracking.group={self.name}",
        ]
        return [sys.executable, "-m", "metadist", *args]


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def read(path, overrides=(), trials=None, storage=None) -> Tune:
    """A tune file with the command line's trials, storage and extra overrides; the space's
    bounds and the config at each bound are checked before anything runs."""
    path = Path(path)
    d = read_file(path, "tune", KEYS, TuneError)
    for key in ("config", "space"):
        if not d.get(key):
            raise TuneError(f"{path}: no '{key}'")
    if not isinstance(d["space"], dict):
        raise TuneError(f"{path}: space maps config keys to {{low, high[, log]}} or {{choices}}")
    t = Tune(
        name=str(d.get("name") or path.stem),
        config=str(d["config"]),
        space=d["space"],
        overrides=[*map(str, d.get("overrides") or []), *overrides],
        trials=int(trials or d.get("trials") or 20),
        enqueue=list(d.get("enqueue") or []),
        pruner=dict(d.get("pruner") or {}),
        storage=str(storage or d.get("storage") or ""),
        seed=int(d.get("seed") or 0),
    )
    cfg = _check(t, path)
    t.root = Path(cfg.run.root if cfg.run.root != "runs" else "runs/tune")
    t.val_every = cfg.train.val_every
    return t


def _check(t: Tune, path: Path):
    """The pruner's keys, the space's entries (the config at each bound) and the enqueued
    trials, checked; -> the config every trial starts from."""
    unknown = sorted(set(t.pruner) - {"startup_trials", "warmup_validations", "by"})
    if unknown:
        raise TuneError(
            f"{path}: pruner has startup_trials, warmup_validations and by, not {unknown[0]}"
        )
    if t.pruner.get("by", "step") not in ("step", "time"):
        raise TuneError(f"{path}: pruner by is step or time, not {t.pruner['by']!r}")
    for key, spec in t.space.items():
        for value in _bounds(key, spec, path):
            try:
                load_config(t.config, [*t.overrides, f"{key}={_value(value)}"])
            except ConfigError as e:
                raise TuneError(f"{path}: space {key} = {value}: {e}") from None
    for params in t.enqueue:
        if not isinstance(params, dict) or set(params) - set(t.space):
            raise TuneError(f"{path}: enqueue lists dicts of the space's keys ({params!r})")
    try:
        cfg = load_config(t.config, t.overrides)
    except ConfigError as e:
        raise TuneError(str(e)) from None
    return cfg


def _bounds(key: str, spec, path) -> list:
    """The values a space entry can take at its ends (checked against the config)."""
    if isinstance(spec, dict) and set(spec) == {"choices"} and spec["choices"]:
        return list(spec["choices"])
    if isinstance(spec, dict) and {"low", "high"} <= set(spec) <= {"low", "high", "log", "step"}:
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise TuneError(f"{path}: space {key}: low and high are numbers")
        if low >= high or (spec.get("log") and low <= 0):
            raise TuneError(f"{path}: space {key}: need low < high (and low > 0 with log)")
        return [low, high]
    raise TuneError(
        f"{path}: space {key}: expected {{low: L, high: H[, log: true][, step: S]}} or "
        f"{{choices: [...]}}, got {spec!r}"
    )


def suggest(trial, key: str, spec: dict):
    if "choices" in spec:
        return trial.suggest_categorical(key, spec["choices"])
    low, high = spec["low"], spec["high"]
    if isinstance(low, int) and isinstance(high, int) and not spec.get("log"):
        return trial.suggest_int(key, low, high, step=int(spec.get("step", 1)))
    if spec.get("step"):
        return trial.suggest_float(key, low, high, step=spec["step"])
    return trial.suggest_float(key, float(low), float(high), log=bool(spec.get("log")))


def _optuna():
    try:
        import optuna
    except ImportError:
        raise TuneError(
            "metadist tune needs Optuna: pip install 'metadist[tune]' (optuna)"
        ) from None
    return optuna


def study(t: Tune):
    """The study at t.url (created on first use), its pruner and a TPE sampler."""
    optuna = _optuna()
    # ERROR: a trial that fails or is interrupted is one line of ours, not Optuna's traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    t.dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat
        storage = optuna.storages.RDBStorage(
            t.url, heartbeat_interval=30, grace_period=120, heartbeat_stale_trial_callback=_retry
        )
    warmup = int(t.pruner.get("warmup_validations", 1))
    startup = int(t.pruner.get("startup_trials", 3))
    if t.pruner.get("by", "step") == "time":
        pruner = time_pruner(startup, warmup)
    else:
        pruner = optuna.pruners.MedianPruner(  # steps are the validations' training steps
            n_startup_trials=startup,
            n_warmup_steps=warmup * t.val_every + 1 if warmup else 0,
            n_min_trials=1,
        )
    s = optuna.create_study(
        study_name=t.name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        pruner=pruner,
        sampler=optuna.samplers.TPESampler(seed=t.seed),
    )
    s.sampler = optuna.samplers.TPESampler(seed=t.seed + len(s.trials))  # another worker's draws
    return s


def time_pruner(startup: int, warmup: int):
    """`by: time`: the reports are keyed by training milliseconds; a trial with at least `warmup`
    validations, once `startup` trials have finished, is pruned when its best validation so far is
    below the median of the finished and pruned trials' best by the same training time (those
    that had validated by then)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    class TrailsAtEqualTime(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            mine = trial.intermediate_values
            if len(mine) < max(warmup, 1):
                return False
            states = (TrialState.COMPLETE, TrialState.PRUNED)
            others = study.get_trials(deepcopy=False, states=states)
            if sum(o.state == TrialState.COMPLETE for o in others) < startup:
                return False
            now = max(mine)
            then = [
                max(v for k, v in o.intermediate_values.items() if k <= now)
                for o in others
                if any(k <= now for k in o.intermediate_values)
            ]
            return bool(then) and max(mine.values()) < statistics.median(then)

    return TrailsAtEqualTime()


def _retry(study, trial) -> None:
    """A trial whose process is gone: the same values again, in the same run folder."""
    run = trial.user_attrs.get("run", f"trial{trial.number:04d}")
    study.enqueue_trial(
        trial.params, user_attrs={"run": run, "retry_of": trial.number}, skip_if_exists=False
    )


def _recover(s) -> int:
    """This host's trials left running by a process that is gone: failed, then retried."""
    from optuna.trial import TrialState

    n = 0
    host = socket.gethostname()
    for tr in s.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = tr.user_attrs.get("pid")
        if tr.user_attrs.get("host") != host or pid is None or locks.alive(pid):
            continue
        s._storage.set_trial_state_values(tr._trial_id, state=TrialState.FAIL)
        _retry(s, tr)
        n += 1
    return n


def search(t: Tune, say=print) -> dict:
    """Run trials until the study holds t.trials finished or pruned ones; write best.yaml."""
    optuna = _optuna()
    from optuna.trial import TrialState

    s = study(t)
    recovered = _recover(s)
    if not s.trials and t.enqueue:
        for params in t.enqueue:
            s.enqueue_trial(params)
    counted = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(s.get_trials(deepcopy=False, states=counted))
    say(
        f"tune {t.name}: {done} of {t.trials} trials done"
        + (f", {recovered} interrupted trial(s) to retry" if recovered else "")
        + f"; study {t.url}"
    )
    with Children() as kids:
        if done < t.trials:
            ends = [optuna.study.MaxTrialsCallback(t.trials, states=counted)]
            with warnings.catch_warnings(), contextlib.suppress(Interrupted):
                warnings.simplefilter("ignore")  # Optuna's experimental-feature notes
                s.optimize(Trials(t, kids, say), callbacks=ends, catch=(TrialFailed,))
    if kids.stopped:
        raise Stopped(f"tune {t.name} stopped by a signal; launch it again to go on")
    return best_yaml(t, s)


class TrialFailed(Exception):
    """A trial's run exited with an error (its log names it): the study records it failed."""


class Interrupted(Exception):
    """A signal stopped the running trial: the search ends, and the trial is retried later."""


class Trials:
    """Optuna's objective: a trial is a training run in a process of its own (`kids`), its
    validations reported as they are written, SIGTERM when the pruner says it trails. Three
    failures in a row end the search (then it is not the trials' values)."""

    def __init__(self, t: Tune, kids: Children, say):
        self.t, self.kids, self.say, self.failures = t, kids, say, 0

    def __call__(self, trial) -> float:
        try:
            value = self.run(trial)
        except TrialFailed as e:
            self.failures += 1
            if self.failures >= 3:
                raise TuneError(f"3 trials in a row failed; the last: {e}") from None
            raise
        self.failures = 0
        return value

    def run(self, trial) -> float:
        import optuna

        t = self.t
        params = {k: suggest(trial, k, spec) for k, spec in t.space.items()}
        run = trial.user_attrs.get("run") or f"trial{trial.number:04d}"
        for k, v in (("run", run), ("host", socket.gethostname()), ("pid", os.getpid())):
            trial.set_user_attr(k, v)
        folder, log = t.dir / "trials" / run, t.dir / "trials" / f"{run}.log"
        folder.mkdir(parents=True, exist_ok=True)
        self.say(f"trial {trial.number} ({run}): " + _shown(params))
        p = start(t.command(params, run), t.dir / "trials", run, log, self.say)
        self.kids.procs[p] = run
        try:
            by_time = t.pruner.get("by", "step") == "time"
            code, pruned_at = _watch(p, trial, folder / "metrics.jsonl", by_time)
        finally:
            self.kids.procs.pop(p, None)
        if self.kids.stopped:  # its values again at the next launch, resumed from its checkpoint
            _retry(trial.study, trial)
            raise Interrupted
        if pruned_at is not None:
            self.say(f"trial {trial.number} ({run}): pruned at step {pruned_at}")
            raise optuna.TrialPruned()
        summary = folder / "summary.json"
        if code != 0 or not summary.is_file():
            lines = log.read_text(errors="replace").strip().splitlines()
            why = f"trial {trial.number} ({run}) failed (exit {code}): {lines[-1] if lines else ''}"
            self.say(why)
            raise TrialFailed(why)
        r = json.loads(summary.read_text())
        self.say(
            f"trial {trial.number} ({run}): best val {r['best_val_accuracy']:.4f} "
            f"({r['steps']} steps, {r['wall_time_s'] / 60:.1f} min)"
        )
        best_yaml(t, trial.study)
        return float(r["best_val_accuracy"])


def _shown(params: dict) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in params.items())


def _watch(p, trial, metrics: Path, by_time: bool = False) -> tuple[int, int | None]:
    """Report each validation as it is written (keyed by its step, or `by_time` by its training
    milliseconds) until the run ends; SIGTERM it once the pruner says so. -> (exit status, the
    step it was pruned at or None)."""
    reported, pruned_at = -1, None
    while True:
        code = p.poll()
        for step, v, ms in _validations(metrics):
            if step > reported:
                trial.report(v, ms if by_time else step)
                reported = step
                if pruned_at is None and trial.should_prune():
                    pruned_at = step
                    p.send_signal(signal.SIGTERM)
        if code is not None:
            return code, pruned_at
        time.sleep(0.2)


def _validations(path: Path) -> list[tuple[int, float, int]]:
    """(step, val accuracy, training milliseconds) of every validation written so far."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "val_accuracy" in r:
            ms = int(1000 * float(r.get("elapsed_s", 0.0)))
            out.append((int(r["step"]), float(r["val_accuracy"]), ms))
    return out


def best_yaml(t: Tune, s) -> dict:
    """The best finished trial as a training config: the base config's file, the overrides and
    the trial's values, in <dir>/best.yaml."""
    from optuna.trial import TrialState

    done = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return {"best": None, "trials": len(s.trials)}
    best = max(done, key=lambda tr: (tr.value, -tr.number))
    tree = yaml.safe_load(Path(t.config).read_text()) or {}
    for item in [*t.overrides, *(f"{k}={_value(v)}" for k, v in best.params.items())]:
        key, value = item.split("=", 1)
        if key.startswith("run.") or key == "tracking.group":
            continue
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value) if value else value
    header = (
        f"# the best of {len(done)} finished trials of the study {t.name} ({t.url}):\n"
        f"# trial {best.number}, best validation accuracy {best.value:.4f}, run "
        f"{t.dir / 'trials' / best.user_attrs.get('run', '')}\n"
        f"# from {t.config} with {' '.join(t.overrides) or 'no overrides'}\n"
    )
    out = t.dir / "best.yaml"
    out.write_text(header + yaml.safe_dump(tree, sort_keys=False))
    return {"best": best.number, "value": best.value, "params": best.params, "config": str(out)}
