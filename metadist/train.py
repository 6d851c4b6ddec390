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

import json
import math
import time
from pathlib import Path

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
from metadist.data.device import Delivery
from metadist.data.order import StreamSpec
from metadist.data.roots import Sources
from metadist.data.split import EpisodeSource, pad_batch
from metadist.distributed import Dist
from metadist.evaluate import Evaluation, format_table
from metadist.log import say
from metadist.log import to as lines_to
from metadist.loop import Clock, Logger, Progress, StopVotes, Validator
from metadist.run_folder import RunFolder
from metadist.schedule import OVERRUN, BudgetFit, ProbeWork, overran, time_limit
from metadist.signals import StopSignals
from metadist.step import MetaStep, Plan, StepSettings, Trainable, TrainError, runner
from metadist.step.compute import one_at_a_time, sample_chunk
from metadist.step.plan import ask_of, candidates, for_run, shape_of
from metadist.step.reduce import chunk_scale
from metadist.tracking import NullTracker, make_tracker

__all__ = ["TrainError", "TrainState", "Trainer", "train"]


def train(cfg: Config, log=print) -> dict:
    """Train `cfg`; the run's lines go to `log` from the main process (metadist.log)."""
    # the names the tables define, and what the algorithm trains on, before anything starts
    algorithms.check(cfg.algo, cfg.data.episode == "variable", bool(cfg.data.sources))
    models.check(cfg.model)
    dist = Dist(cfg.train.collective_timeout_s, cfg.train.threads)
    run = RunFolder(cfg.run, config_mod.to_yaml(cfg), dist.is_main)
    # the clean-up too runs with the stop signals caught: when one rank stops with an error, the
    # launcher SIGTERMs the others, which must still reach their own one-line error
    with StopSignals() as signals, lines_to(log, dist.is_main):
        try:
            return Trainer(cfg, dist, run, signals).fit()
        finally:
            run.close()
            dist.close()


class Trainer:
    """One run of meta-training: built once from the config (`__init__`), then `fit()`."""

    # the run; its data (the sources, how shards are read, splits, this rank's batches)
    cfg: Config
    dist: Dist
    run_dir: Path
    start_step: int  # this launch's first step (a resumed run's checkpoint)
    sources: Sources
    train_splits: list[EpisodeSource]
    stream: object
    # what it trains (model, algorithm, Adam, schedule), the state kept, the plan and its step
    trainable: Trainable
    state: TrainState
    checkpoints: CheckpointManager
    plan: Plan
    meta_step: MetaStep
    # the loop's components, each deciding when it acts (metadist/loop.py), and evaluation
    evaluation: Evaluation
    tracker: NullTracker  # or WandbTracker
    progress: Progress
    logger: Logger
    validator: Validator
    stop: StopVotes
    budget: BudgetFit

    def __init__(self, cfg: Config, dist: Dist, run: RunFolder, signals: StopSignals):
        self.cfg, self.dist, self.run_dir = cfg, dist, run.dir
        self._open(run)
        self._build_model()
        self._build_step()
        self._build_loop(signals)

    # ---- what the parts hold, named ----
    @property
    def model(self) -> torch.nn.Module:
        return self.trainable.model

    @property
    def algorithm(self):
        return self.trainable.algorithm

    @property
    def local_tasks(self) -> int:
        return config_mod.shares(self.cfg.train.meta_batch_size, self.dist.world)

    @property
    def image_shape(self) -> tuple:
        """The images' shape (C, H, W): it travels from the shards."""
        return tuple(self.train_splits[0].manifest["image_shape"])

    # ---- set-up ----
    def _open(self, run: RunFolder) -> None:
        """Debug switches, the run folder and the shards (main process: many sources checked to
        mix and recorded), then every rank opens the train split(s)."""
        t, d, dist = self.cfg.train, self.cfg.data, self.dist
        if t.debug:
            debug_switches(dist)
        self.sources = sources = Sources.of(d, say)
        failed = None
        if dist.is_main:
            try:
                if sources.many:  # each prepared on its own: they mix, or nothing starts
                    want = (d.channels, d.image_size, d.image_size)
                    sources.check_mix(self._algo(), want)
                run.open()
                sources.settle(d, run.dir)
            except Exception as e:
                failed = e
        if dist.broadcast_object(failed is not None):
            raise failed or TrainError("the main process could not set up the run (see its error)")
        for note in run.notes:
            say(note)
        if e := dist.elastic:
            say(
                f"torch elastic: run {e['run_id']}, restart {e['restart']} of at most "
                f"{e['max_restarts']}, {e['nodes']} node(s), {dist.world} process(es)"
            )
        self.train_splits = sources.open("train", self.cfg.seed)

    def _algo(self) -> tuple:
        return algorithms.get(self.cfg.algo), self.cfg.algo

    def _build_model(self) -> None:
        """The model the algorithm's head needs (initialised from the run's seed, or from
        model.init) on the device, and what trains it (Trainable: the algorithm, Adam, the
        schedule)."""
        cfg, (cls, _), device = self.cfg, self._algo(), self.dist.device
        self.sources.check(self.train_splits, self._algo(), self.image_shape)
        self.dist.seed(cfg.seed)
        classes = len(self.train_splits[0].manifest["classes"])
        ways = cfg.data.episode_shape("train")[0]
        rows = cls.head_rows(cfg.algo, ways, classes)
        model = algorithms.model_of(cfg.model, cfg.algo, self.image_shape, rows).to(device)
        if cfg.model.init:
            kept = load_init(model, cfg.model.init)
            more = f"{', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}"
            say(
                f"model.init={cfg.model.init}: started from its tensors"
                + (f"; at their initialisation: {more}" if kept else "")
            )
        self.trainable = Trainable.of(cfg.train, cfg.algo, ways, model, device)

    def _build_step(self) -> None:
        """The checkpoint (restored), the plan (kept from the checkpoint, or decided), then the
        step, built once from it."""
        cfg, t, dist = self.cfg, self.cfg.train, self.dist
        s = self.state = TrainState()
        parts = Parts(self.model, self.trainable.optimizer, self.trainable.schedule, s)
        self.checkpoints = CheckpointManager(
            self.run_dir, t.checkpoint_every, t.keep_checkpoints, dist.is_main, parts, cfg.to_dict()
        )
        resumed = None if cfg.run.fresh else self.checkpoints.restore()
        if resumed is not None:
            say_resumed(self.run_dir, resumed.name, s, dist)
        split, d = self.train_splits[0], cfg.data
        sections, device = (cfg.model, cfg.algo, cfg.train), self.dist.device.type
        ask = ask_of(sections, dist.world, device, split.variable, self.sources.many)
        sample = lambda n: (
            pad_batch(split.records_at(range(n)), split.gather)
            if split.variable
            else sample_chunk(d.episode_shape("train"), self.image_shape, n)
        )
        scale = chunk_scale(t.reduce, t.meta_batch_size, self.local_tasks)
        measure = runner(self.trainable, sample, max(candidates(ask)), dist.device, scale)
        record = self.run_dir / "strategy.json"
        self.plan = for_run(ask, s.plan, record, dist, measure, self.shape())
        s.plan, s.threads, s.meta_batch_size = self.plan.record(), dist.threads, t.meta_batch_size
        s.seed, s.world_size = cfg.seed, dist.world
        settings = StepSettings.of(t, cfg.algo, cfg.seed, self.local_tasks, self.dist.device)
        self.meta_step = MetaStep(self.trainable, dist, self.plan, settings)
        if s.step >= t.steps:
            say(f"{self.run_dir}: already trained {s.step} of {t.steps} steps")

    def shape(self) -> dict:
        """What decides a chunk's speed (the plan's and the budget's cache key, with the
        machine)."""
        head_init, second = self.algorithm.train_inner.head_init, self.trainable.second_order
        variable = self.train_splits[0].variable
        c, device = self.cfg, self.dist.device.type
        sections = (c.model, c.algo, c.data, c.train)
        return shape_of(sections, self.image_shape, variable, head_init, second, device)

    def _build_stream(self):
        """This rank's training batches from the resumed step (the algorithm says which), held
        on the device or prefetched to it as delivery decides (metadist/data/device.py)."""
        t, d, dist, splits = self.cfg.train, self.cfg.data, self.dist, self.train_splits
        many = self.sources.many
        delivery = Delivery(d, self.dist.device, splits[0], many)
        spec = StreamSpec(
            seed=self.cfg.seed,
            meta_batch_size=t.meta_batch_size,
            rank=dist.rank,
            world_size=dist.world,
            start=self.state.step,
            stop=t.steps,
            task_aug=d.task_aug,
            num_workers=d.num_workers,
            device=delivery.resident,
            source_weights=self.sources.weights if many else (),
        )
        return delivery.wrap(self.algorithm.stream(splits if many else splits[0], spec))

    def _build_loop(self, signals: StopSignals) -> None:
        """The val episodes, the stream, the tracker, the logger, the validator, the stop votes on
        the training clock, the budget."""
        cfg, t, dist = self.cfg, self.cfg.train, self.dist
        ways, model = cfg.data.ways, self.model  # the val and test episodes' (train_ways: train's)
        inner_of = lambda steps: algorithms.eval_inner(cfg.algo, cfg.eval, model, ways, steps)
        at_once, sources = one_at_a_time(self.plan.at_once), self.sources
        self.evaluation = Evaluation(model, inner_of, sources, cfg.eval, at_once, dist)
        self.stream = self._build_stream()
        self.tracker = make_tracker(
            cfg.tracking, cfg.run.name, cfg.to_dict(), self.run_dir, dist.is_main
        )
        schedule = self.trainable.schedule
        self.progress = Progress(lambda: schedule.total, self.state.step, dist.is_main)
        self.logger = Logger(
            every=t.log_every,
            tasks=t.meta_batch_size,
            dist=dist,
            tracker=self.tracker,
            progress=self.progress,
            lr=schedule.lr,
            names=self.sources.labels,
        )
        self.validator = Validator(
            t.val_every,
            self.evaluation.validate,
            self.checkpoints.save_best,
            dist.is_main,
            self.progress,
        )
        limit = time_limit(t) if dist.is_main else math.inf
        every = t.sync_every or (10 if self.dist.device.type == "cuda" else 1)
        clock = Clock(self.state.elapsed)
        self.stop = StopVotes(limit, every, signals, self.dist.device, clock)
        work = ProbeWork(self.evaluation.some, self.checkpoints.time_write)
        shape = dict(self.shape(), at_once=self.plan.at_once)
        if self.plan.compute != "eager":  # the compute decided (algo.compile=auto) times a step too
            shape["compute"] = self.plan.compute
        val = self.evaluation.val_episodes
        self.budget = BudgetFit(t, val, shape, dist, self.run_dir, work)

    # ---- the loop ----
    def fit(self) -> dict:
        t, state, device, plan = self.cfg.train, self.state, self.dist.device, self.plan
        say(
            f"training {self.cfg.algo.name} ({plan.line(t.meta_batch_size)}) on "
            f"{self.dist.world} process(es), {device}, {self.dist.threads} thread(s) each: "
            f"{t.meta_batch_size} tasks/step ({self.local_tasks} per process), steps "
            f"{state.step}..{t.steps}"
        )
        self.start_step, stop = state.step, None  # a resumed run's step is its checkpoint's (> 0)
        metrics = self.run_dir / "metrics.jsonl" if self.dist.is_main else None
        self.stop.clock.start()
        with self.logger.opened(metrics, state.step or None):
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
        batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        loss_sum, acc_sum, grad_norm, agreed = self.meta_step(step, batch, self.stop.votes)
        state.step, state.tasks_seen = step + 1, state.tasks_seen + t.meta_batch_size
        state.elapsed = self.stop.clock()
        if state.step == self.start_step + 1:
            say(f"first meta-step done {time.time() - LAUNCHED:.1f} s after launch")
        self.budget.maybe_fix(state.step, self.trainable.schedule)
        stop = self.stop.check(agreed, state.step)
        last = state.step >= self.trainable.schedule.total or stop is not None
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
        t = self.cfg.train
        if stop == "time":
            over = f" (x {OVERRUN:g} with its budget schedule)" if t.budget_schedule else ""
            say(f"train.max_minutes={t.max_minutes}{over} reached at step {self.state.step}")
        elif self.dist.is_main and (line := overran(t, self.state.elapsed)):
            say(line)
        return self.finish()

    def finish(self) -> dict:
        """Final weights, the algorithm's outputs, the best weights' test report, summary.json."""
        cfg, dist, state, config = self.cfg, self.dist, self.state, self.cfg.to_dict()
        if dist.is_main:
            save_weights(self.model, self.run_dir / "model.safetensors", config, state.step)
        dist.barrier()
        best = self.run_dir / "best.safetensors"
        if best.is_file():
            self.model.load_state_dict(load_weights(best)[0])
        if dist.is_main:
            for name, tensors in self.algorithm.outputs(self.model).items():
                step, val = state.best_step or state.step, state.best_val
                save_weights(self.model, self.run_dir / name, config, step, val, tensors)
        r = self.evaluation.test() if cfg.eval.test else None
        summary = run_summary(
            r,
            state,
            self.sources,
            dict(
                run_facts(state, dist, self.plan, self.start_step),
                algorithm=cfg.algo.name,
                seed=cfg.seed,
                data_seed=cfg.data.seed,
            ),
        )
        if dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            if r is not None and self.sources.many:
                say(format_table(r, "test source"))
            say(final_line(r, state, self.sources.many))
            self.tracker.summary(flat_summary(summary))
            if cfg.tracking.log_model:
                self.tracker.log_model(self.run_dir / "model.safetensors")
        self.tracker.finish()
        return summary


def debug_switches(dist: Dist) -> None:
    """train.debug: one process, anomaly detection, deterministic kernels."""
    if dist.world > 1:
        raise ConfigError(
            "train.debug runs a single process on one device; launch it without accelerate"
        )
    torch.autograd.set_detect_anomaly(True)
    torch.use_deterministic_algorithms(True)


def say_resumed(run_dir: Path, name: str, s: TrainState, dist: Dist) -> None:
    """A resumed run's line, and where its float32 rounding changes."""
    say(f"resuming {run_dir} from {name} (written by {s.world_size} process(es), now {dist.world})")
    if dist.device.type == "cpu" and s.threads and s.threads != dist.threads:
        say(
            f"note: this launch runs {dist.threads} intra-op thread(s) per process, the "
            f"checkpoint's {s.threads}: on a CPU the float32 rounding of the steps from "
            "here differs (set train.threads to keep it)"
        )


def run_facts(s: TrainState, dist: Dist, plan: Plan, start_step: int) -> dict:
    """What summary.json says of how the run ran (`start_step`: this launch's first step)."""
    return {
        "world_size": dist.world,
        "plan": s.plan,
        "tasks_at_once": plan.at_once,
        "reduce": plan.reduce,
        "threads": dist.threads,
        "allreduce_ms_per_step": 1000 * dist.reduce_seconds / max(1, s.step - start_step),
    }


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


def run_summary(r: dict | None, s: TrainState, sources: Sources, facts: dict) -> dict:
    """summary.json of a finished run: its test report `r` (per source with their test sets'
    ids; None: the test split was not read), best validation, steps, tasks seen, time, speed,
    then `facts` (how it ran: world size, the step's plan, ...)."""
    test = {} if r is None else dict(sources.test_record(r), test_inner_steps=r["inner_steps"])
    return {
        **test,
        "best_val_accuracy": s.best_val,
        "best_step": s.best_step,
        "steps": s.step,
        "tasks_seen": s.tasks_seen,
        "wall_time_s": s.elapsed,
        "tasks_per_s": s.tasks_seen / max(s.elapsed, 1e-9),
        **facts,
    }


def flat_summary(summary: dict) -> dict:
    """summary.json for W&B: the per-source rows as test_accuracy/<source>, test_ci95/<source>."""
    out = {k: v for k, v in summary.items() if k != "test_sources"}
    for name, row in summary.get("test_sources", {}).items():
        out[f"test_accuracy/{name}"], out[f"test_ci95/{name}"] = row["accuracy"], row["ci95"]
    return out
