"""Meta-training: `train(cfg)` builds a `Trainer` and runs it. The Trainer builds every component
once, from its config section (the run folder and shards, the model, the learner: algorithm,
Adam and `Schedule`, the `CheckpointManager` over the stateful parts, the step's `Plan` and the
`MetaStep` built from it, the train stream, the logger, the validator, the stop votes); then
`fit()` is a flat loop in which each component decides when it acts (metadist/loop.py). The ranks
agree on when to stop (the step count, `train.max_minutes`, a preemption signal) through votes that
ride the gradient reduction, so no step has a collective or a host sync of its own.

Run folder <run.root>/<run.name> (run_folder.py): config.yaml, metrics.jsonl, checkpoints/,
best.safetensors, model.safetensors, summary.json, strategy.json (the step's plan), schedule.json
(with train.budget_schedule), sources.json (many sources), the algorithm's own outputs (pretrain:
backbone.safetensors) and W&B's offline files. Launching again on an existing run folder resumes
from its latest complete checkpoint, with any number of processes the plan allows (run.fresh=true
starts over). Progress: a bar on a terminal; one plain line per log step when stderr is a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import torch

from metadist import LAUNCHED, algorithms, models
from metadist import config as config_mod
from metadist.checkpoint import (
    CheckpointManager,
    Parts,
    TrainState,
    load_init,
    load_weights,
    save_weights,
)
from metadist.config import Config, ConfigError
from metadist.data.device import Prefetch, fits_device
from metadist.data.order import StreamSpec
from metadist.data.prepare import ensure, shards_dir
from metadist.data.split import (
    EpisodeSource,
    check_sources,
    open_sources,
    pad_batch,
    record_sources,
    source_names,
)
from metadist.data.store import Access, mapped_fault, read_manifest
from metadist.distributed import Dist
from metadist.evaluate import evaluate, format_table, test_report
from metadist.loop import Clock, Logger, Progress, StopVotes, Validator
from metadist.models import build_model
from metadist.run_folder import RunFolder
from metadist.schedule import BudgetFit, ProbeWork
from metadist.signals import StopSignals
from metadist.step import Learner, MetaStep, StepSettings, TrainError, runner
from metadist.step.compute import sample_chunk, strategy
from metadist.step.plan import ask_of, candidates, for_run, shape_of
from metadist.tracking import make_tracker

__all__ = ["TrainError", "TrainState", "Trainer", "train"]


def train(cfg: Config, log=print) -> dict:
    # the names the tables define, and what the algorithm trains on, before anything starts
    algorithms.check(cfg.algo, cfg.data.episode == "variable", bool(cfg.data.sources))
    models.check(cfg.model)
    dist = Dist(cfg.train.collective_timeout_s, cfg.train.threads)
    run = RunFolder(cfg.run, config_mod.to_yaml(cfg), dist.is_main)
    # the clean-up too runs with the stop signals caught: when one rank stops with an error, the
    # launcher SIGTERMs the others, which must still reach their own one-line error
    with StopSignals() as signals:
        try:
            return Trainer(
                cfg, dist, run, signals, log if dist.is_main else (lambda *a, **k: None)
            ).fit()
        finally:
            run.close()
            dist.close()


class Trainer:
    """One run of meta-training: built once from the config (`__init__`), then `fit()`."""

    def __init__(self, cfg: Config, dist: Dist, run: RunFolder, signals: StopSignals, say):
        self.cfg, self.dist, self.say, self.signals = cfg, dist, say, signals
        self.device = dist.device
        self.local_tasks = config_mod.shares(cfg.train.meta_batch_size, dist.world)
        self.config = cfg.to_dict()
        self.run_dir = run.dir
        self._open(run)
        self._build_model()
        self._build_step()
        self._build_loop()

    # ---- set-up ----
    def _open(self, run: RunFolder) -> None:
        """Debug switches, the run folder and the shards (main process: many sources checked to
        mix and recorded), then every rank opens the train split(s)."""
        t, d, dist = self.cfg.train, self.cfg.data, self.dist
        if t.debug:
            if dist.world > 1:
                raise ConfigError(
                    "train.debug runs a single process on one device; launch it without accelerate"
                )
            torch.autograd.set_detect_anomaly(True)
            torch.use_deterministic_algorithms(True)
        self.roots = list(d.sources) or [shards_dir(d)]
        self.root, self.names = self.roots[0], source_names(d.sources) if d.sources else []
        failed = None
        if dist.is_main:
            try:
                if self.names:  # many sources, each prepared on its own: they mix, or nothing
                    problem = lambda: algorithms.get(self.cfg.algo).variable_problem(self.cfg.algo)
                    want = (d.channels, d.image_size, d.image_size)
                    check_sources(open_sources(self.roots, "train"), want, problem)
                run.open()
                if self.names:
                    record_sources(self.names, self.roots, d.source_weights, run.dir, self.say)
                else:
                    ensure(d, log=self.say)
            except Exception as e:
                failed = e
        if dist.broadcast_object(failed is not None):
            raise failed or TrainError("the main process could not set up the run (see its error)")
        for note in run.notes:
            self.say(note)
        if e := dist.elastic:
            self.say(
                f"torch elastic: run {e['run_id']}, restart {e['restart']} of at most "
                f"{e['max_restarts']}, {e['nodes']} node(s), {dist.world} process(es)"
            )
        self.access = Access.of(d, self.say)
        self.train_splits = open_sources(self.roots, "train", self.cfg.seed, self.access)
        self.train_split = self.train_splits[0]
        # the shape travels from the shards
        self.image_shape = tuple(self.train_split.manifest["image_shape"])

    def _build_model(self) -> None:
        """The model the algorithm's head needs (initialised from the run's seed, or from
        model.init)."""
        cfg, cls = self.cfg, algorithms.get(self.cfg.algo)
        if self.train_split.variable and (problem := cls.variable_problem(cfg.algo)):
            raise ConfigError(problem)
        if self.names and (problem := cls.sources_problem(cfg.algo)):
            raise ConfigError(problem)
        self.dist.seed(cfg.seed)
        rows = cls.head_rows(cfg.algo, cfg.data.ways, len(self.train_split.manifest["classes"]))
        self.model = build_model(cfg.model, cfg.algo, self.image_shape, rows).to(self.device)
        if cfg.model.init:
            kept = load_init(self.model, cfg.model.init)
            more = f"{', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}"
            self.say(
                f"model.init={cfg.model.init}: started from its tensors"
                + (f"; at their initialisation: {more}" if kept else "")
            )

    def _build_step(self) -> None:
        """The learner, the checkpoint, the plan (kept from the checkpoint, or decided), then the
        step, built once from it."""
        cfg, t, dist = self.cfg, self.cfg.train, self.dist
        self.learner = Learner.of(cfg, self.model, self.device)
        self.schedule, self.algorithm = self.learner.schedule, self.learner.algorithms[False]
        s = self.state = TrainState()
        parts = Parts(self.model, self.learner.optimizer, self.schedule, s)
        self.checkpoints = CheckpointManager(
            self.run_dir, t.checkpoint_every, t.keep_checkpoints, dist.is_main, parts, self.config
        )
        self.resumed = None if cfg.run.fresh else self.checkpoints.restore()
        if self.resumed is not None:
            self.say(
                f"resuming {self.run_dir} from {self.resumed.name} (written by {s.world_size} "
                f"process(es), now {dist.world})"
            )
            if self.device.type == "cpu" and s.threads and s.threads != dist.threads:
                self.say(
                    f"note: this launch runs {dist.threads} intra-op thread(s) per process, the "
                    f"checkpoint's {s.threads}: on a CPU the float32 rounding of the steps from "
                    "here differs (set train.threads to keep it)"
                )
        variable = self.train_split.variable
        ask = ask_of(cfg, dist.world, self.device.type, variable, bool(self.names))
        record = self.run_dir / "strategy.json"
        split, d = self.train_split, cfg.data
        sample = lambda n: (
            pad_batch(split.records_at(range(n)), split.gather)
            if split.variable
            else sample_chunk((d.ways, d.shots, d.queries), self.image_shape, n)
        )
        measure = runner(self.learner, sample, max(candidates(ask)), self.device)
        self.plan = for_run(ask, s.plan, record, dist, measure, self.shape(), self.say)
        s.plan, s.threads, s.meta_batch_size = self.plan.record(), dist.threads, t.meta_batch_size
        s.seed, s.world_size = cfg.seed, dist.world
        settings = StepSettings.of(cfg, self.local_tasks, self.device)
        self.meta_step = MetaStep(self.learner, dist, self.plan, settings, self.say)
        if s.step >= t.steps:
            self.say(f"{self.run_dir}: already trained {s.step} of {t.steps} steps")

    def shape(self) -> dict:
        """What decides a chunk's speed (the plan's and the budget's cache key, with the
        machine)."""
        head_init, second = self.algorithm.train_inner.head_init, self.learner.second_order
        variable = self.train_split.variable
        return shape_of(self.cfg, self.image_shape, variable, head_init, second, self.device.type)

    def _build_stream(self):
        """This rank's training batches from the resumed step (the algorithm says which), the train
        split resident on the device when data.device_cache says so."""
        cfg, t, d, dist, split = (
            self.cfg,
            self.cfg.train,
            self.cfg.data,
            self.dist,
            self.train_split,
        )
        nbytes, device = split.manifest["bytes"], self.device
        resident = not (split.variable or self.names) and fits_device(
            nbytes, device, d.device_cache, d.device_cache_fraction
        )
        spec = StreamSpec(
            cfg.seed, t.meta_batch_size, dist.rank, dist.world, self.state.step, t.steps,
            d.task_aug, d.num_workers, device if resident else None, tuple(d.source_weights),
        )  # fmt: skip
        stream = self.algorithm.stream(self.train_splits if self.names else split, spec)
        # too big to keep on the GPU: gathered on the host, copied one step ahead
        return Prefetch(stream, device) if device.type == "cuda" and not resident else stream

    def _build_loop(self) -> None:
        """The stream, the logger, the validator, the training clock and the stop votes, the
        budget."""
        cfg, t, dist = self.cfg, self.cfg.train, self.dist
        self.val_sets = {
            name: EpisodeSource(root, "val", access=self.access).all()
            for name, root in zip(self.names or [""], self.roots)
        }
        self.stream = self._build_stream()
        self.tracker = make_tracker(
            cfg.tracking, cfg.run.name, self.config, self.run_dir, dist.is_main
        )
        self.progress = Progress(
            lambda: self.schedule.total, self.state.step, dist.is_main, self.say
        )
        self.logger = Logger(
            t.log_every, t.meta_batch_size, dist, self.tracker, self.progress, self.schedule.lr,
            self.names,
        )  # fmt: skip
        save_best = self.checkpoints.save_best
        self.validator = Validator(
            t.val_every, self._validate, save_best, dist.is_main, self.progress
        )
        self.clock = Clock(self.state.elapsed)
        limit = 60 * t.max_minutes if dist.is_main and t.max_minutes else math.inf
        every = t.sync_every or (10 if self.device.type == "cuda" else 1)
        self.stop = StopVotes(limit, every, self.signals, self.device, mapped_fault, self.clock)
        val_episodes = sum(len(v) for v in self.val_sets.values())
        work = ProbeWork(self._evaluate_some, self.checkpoints.time_write)
        shape = dict(self.shape(), at_once=self.plan.at_once)
        self.budget = BudgetFit(t, val_episodes, shape, dist, self.run_dir, work, self.say)

    # ---- pieces the components call ----
    def evaluate(self, episodes, steps: int, dist=None) -> float:
        inner = algorithms.eval_inner(
            self.cfg.algo, self.cfg.eval, self.model, self.algorithm.train_inner.ways, steps
        )
        batch, at_once = self.cfg.eval.tasks_per_batch, strategy(self.plan.at_once)
        return evaluate(self.model, episodes, inner, batch, self.device, at_once, dist)["accuracy"]

    def _validate(self) -> dict:
        """The val accuracy on the fixed val episodes (many sources: the mean of theirs, each one's
        as val_accuracy/<source> too)."""
        steps = self.cfg.eval.val_inner_steps
        accs = {n: self.evaluate(eps, steps, self.dist) for n, eps in self.val_sets.items()}
        out = {"val_accuracy": sum(accs.values()) / len(accs)}
        if self.names:
            out.update({f"val_accuracy/{name}": a for name, a in accs.items()})
        return out

    def _evaluate_some(self) -> int:
        """One validation on a few val episodes (the budget schedule times it)."""
        some = next(iter(self.val_sets.values())).first(2 * self.cfg.eval.tasks_per_batch)
        self.evaluate(some, self.cfg.eval.val_inner_steps)
        return len(some)

    # ---- the loop ----
    def fit(self) -> dict:
        t, state, device, plan = self.cfg.train, self.state, self.device, self.plan
        self.say(
            f"training {self.cfg.algo.name} ({plan.line(t.meta_batch_size)}) on "
            f"{self.dist.world} process(es), {device}, {self.dist.threads} thread(s) each: "
            f"{t.meta_batch_size} tasks/step ({self.local_tasks} per process), steps "
            f"{state.step}..{t.steps}"
        )
        self.start_step, stop = state.step, None
        metrics = self.run_dir / "metrics.jsonl" if self.dist.is_main else None
        self.clock.start()
        with self.logger.opened(metrics, state.step if self.resumed else None):
            try:
                for batch in self.stream:
                    stop, last = self._step(batch)
                    if last:  # a stop vote, or the step count (the budget's may end first)
                        break
            finally:
                self.progress.close()
        return self._stopped(stop)

    def _step(self, batch: dict) -> tuple[str | None, bool]:
        """One meta-step, then each component's turn: the budget, the stop votes, the log record
        and validation, the checkpoint. Returns (why to stop or None, whether it was the last)."""
        t, state = self.cfg.train, self.state
        step = batch.pop("step")
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        loss_sum, acc_sum, grad_norm, agreed = self.meta_step(step, batch, self.stop.votes)
        state.step, state.tasks_seen = step + 1, state.tasks_seen + t.meta_batch_size
        state.elapsed = self.clock()
        if state.step == self.start_step + 1:
            self.say(f"first meta-step done {time.time() - LAUNCHED:.1f} s after launch")
        self.budget.maybe_fix(state.step, self.schedule)
        stop = self.stop.check(agreed, state.step)
        last = state.step >= self.schedule.total or stop is not None
        self.logger.add(loss_sum, acc_sum, self.local_tasks, batch.get("source"))
        rec = self.logger.record(state, last, grad_norm)
        rec = self.validator(state, last, rec)
        self.logger.write(rec)
        if self.checkpoints.due(state.step, last):
            self.checkpoints.save(state.step)
            self.dist.barrier()  # no rank runs ahead of a checkpoint being written
        self.progress.update()
        return stop, last

    def _stopped(self, stop: str | None) -> dict:
        """A fault or a signal: the checkpoint is written, the error says so; else finish()."""
        if stop in ("fault", "signal"):
            self.tracker.finish()
        self.stop.raise_for(stop, self.state.step, self.checkpoints.dir)
        if stop == "time":
            self.say(
                f"train.max_minutes={self.cfg.train.max_minutes} reached at step {self.state.step}"
            )
        return self.finish()

    def test(self) -> dict:
        """The best weights' test report (per source with many), with the inner steps taken."""
        cfg, ways = self.cfg, self.algorithm.train_inner.ways
        inner = algorithms.eval_inner(cfg.algo, cfg.eval, self.model, ways)
        limit = cfg.eval.episodes_per_source if self.names else cfg.eval.test_episodes
        tests = {
            n: EpisodeSource(r, "test", access=self.access).all(limit)
            for n, r in zip(self.names or [""], self.roots)
        }
        kw = {"strategy": strategy(self.plan.at_once), "dist": self.dist, "device": self.device}
        r = test_report(self.model, tests, bool(self.names), inner, cfg.eval.tasks_per_batch, **kw)
        r["inner_steps"] = inner.steps  # taken (protonet: 0 unless eval.finetune)
        return r

    def finish(self) -> dict:
        """Final weights, the algorithm's outputs, the best weights' test report, summary.json."""
        cfg, dist, state = self.cfg, self.dist, self.state
        if dist.is_main:
            save_weights(self.model, self.run_dir / "model.safetensors", self.config, state.step)
        dist.barrier()
        best = self.run_dir / "best.safetensors"
        if best.is_file():
            self.model.load_state_dict(load_weights(best)[0])
        if dist.is_main:
            for name, tensors in self.algorithm.outputs(self.model).items():
                step, val = state.best_step or state.step, state.best_val
                save_weights(self.model, self.run_dir / name, self.config, step, val, tensors)
        r = self.test() if cfg.eval.test else None
        summary = run_summary(self, r)
        if dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            if r is not None and self.names:
                self.say(format_table(r, "test source"))
            self.say(final_line(r, state, bool(self.names)))
            self.tracker.summary(flat_summary(summary))
            if cfg.tracking.log_model:
                self.tracker.log_model(self.run_dir / "model.safetensors")
        self.tracker.finish()
        return summary


def final_line(r: dict | None, state: TrainState, many: bool) -> str:
    """The run's last line: its test accuracy (or best validation, without a test)."""
    took = f"{state.step} steps in {state.elapsed / 60:.1f} min"
    if r is None:
        return (
            f"best val accuracy {state.best_val:.4f} at step {state.best_step} (the test split "
            f"not read: eval.test=false); {took}"
        )
    return (
        f"test accuracy {r['accuracy']:.4f} +- {r['ci95']:.4f} (95% CI, {r['episodes']} episodes"
        f"{', mean over sources' if many else ''}, {r['inner_steps']} inner steps); {took}"
    )


def run_summary(run: Trainer, r: dict | None) -> dict:
    """summary.json of a finished run: its test report `r` (per source with their test sets'
    ids; None: the test split was not read), best validation, steps, tasks seen, time, speed,
    world size and the step's plan."""
    cfg, s, names, roots = run.cfg, run.state, run.names, run.roots
    test = {}
    if r is not None:
        test = {
            "test_accuracy": r["accuracy"],
            "test_ci95": r["ci95"],
            "test_episodes": r["episodes"],
            "test_set": test_set_id(*roots),
        }
        if names:
            test["test_sources"] = {
                n: dict(r["sources"][n], test_set=test_set_id(root))
                for n, root in zip(names, roots)
            }
        test["test_inner_steps"] = r["inner_steps"]
    return {
        **test,
        "best_val_accuracy": s.best_val,
        "best_step": s.best_step,
        "steps": s.step,
        "tasks_seen": s.tasks_seen,
        "wall_time_s": s.elapsed,
        "tasks_per_s": s.tasks_seen / max(s.elapsed, 1e-9),
        "world_size": run.dist.world,
        "plan": s.plan,
        "tasks_at_once": run.plan.at_once,
        "reduce": run.plan.reduce,
        "threads": run.dist.threads,
        "algorithm": cfg.algo.name,
        "seed": cfg.seed,
        "data_seed": cfg.data.seed,
        "allreduce_ms_per_step": 1000 * run.dist.reduce_seconds / max(1, s.step - run.start_step),
    }


def test_set_id(*roots) -> str:
    """16 hex digits naming the test episodes of these shards roots (from their shards' hashes):
    equal ids, same test."""
    shards = [s for root in roots for s in read_manifest(root, "test")["shards"]]
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]


def flat_summary(summary: dict) -> dict:
    """summary.json for W&B: the per-source rows as test_accuracy/<source>, test_ci95/<source>."""
    out = {k: v for k, v in summary.items() if k != "test_sources"}
    for name, row in summary.get("test_sources", {}).items():
        out[f"test_accuracy/{name}"], out[f"test_ci95/{name}"] = row["accuracy"], row["ci95"]
    return out
