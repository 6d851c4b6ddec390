"""Meta-training: `train(cfg)`. Set-up (run folder, shards, model, resume) comes first, then
the loop, which fits on a screen: each step is a `MetaStep` (step.py); the logger, the validator
and the checkpointer each decide when they act; the ranks agree on when to stop (the step
budget, `train.max_minutes`, a preemption signal) through votes that ride the gradient
all-reduce, so no step has a collective or a host sync of its own.

Run folder <run.root>/<run.name> (run_folder.py): config.yaml, metrics.jsonl, checkpoints/,
best.safetensors, model.safetensors, summary.json, strategy.json (and W&B's offline files).
Launching again on an existing run folder resumes from its latest complete checkpoint, with any
number of processes (run.fresh=true starts over). Progress: a bar on a terminal; one plain line
per log step when stderr is a file (SLURM's .out, `kubectl logs`, CI).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from metadist import LAUNCHED
from metadist import config as config_mod
from metadist import algorithms, models
from metadist import strategy as strategy_mod
from metadist.models import build_model
from metadist.checkpoint import Checkpointer, TrainState, backbone_weights, load_init, load_weights, save_weights
from metadist.config import Config, ConfigError, TrainConfig
from metadist.data.prepare import ensure, shards_dir
from metadist.data.shards import EpisodeSource, meta_batches, read_manifest
from metadist.distributed import Dist
from metadist.errors import Preempted
from metadist.evaluate import evaluate
from metadist.run_folder import RunFolder
from metadist.signals import StopSignals
from metadist.step import MetaStep, TrainError
from metadist.tracking import make_tracker

__all__ = ["train", "TrainState", "TrainError"]


class StopVotes:
    """Whether to stop after this step, agreed by all ranks: each rank votes (rank 0 for the
    wall-clock bound, every rank for a signal it received); the votes are averaged in the
    gradient all-reduce and read on the host every `sync_every` steps (the same steps on every
    rank, so all stop at the same one)."""

    def __init__(self, cfg: Config, signals: StopSignals, is_main: bool, device: torch.device):
        self.limit = 60 * cfg.train.max_minutes if is_main and cfg.train.max_minutes else math.inf
        self.every = cfg.train.sync_every or (10 if device.type == "cuda" else 1)
        self.signals, self.pending = signals, None
        self.clock = lambda: math.inf   # set by the loop: the run's training time so far
        # every possible vote, already on the device: picking one is a view, never a host->device copy
        self.table = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], device=device)

    def votes(self) -> torch.Tensor:
        return self.table[2 * int(self.clock() >= self.limit) + int(self.signals.received is not None)]

    def check(self, agreed: torch.Tensor, step: int) -> str | None:
        """None, "time" or "signal" (a signal wins)."""
        self.pending = agreed if self.pending is None else torch.maximum(self.pending, agreed)
        if step % self.every:
            return None
        time_vote, signal_vote = self.pending.tolist()
        self.pending = None
        return "signal" if signal_vote > 0 else "time" if time_vote > 0 else None


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise one plain line per log record (a bar
    redrawn with \\r every step makes a log file one unreadable line). Main process only."""

    def __init__(self, total: int, initial: int, enabled: bool, say):
        self._total, self.say, self.enabled = total, say, enabled
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr) \
            if enabled and sys.stderr.isatty() else None

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = value
        if self.bar is not None:
            self.bar.total = value
            self.bar.refresh()

    def show(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['accuracy']:.3f}", tps=f"{rec['tasks_per_s']:.0f}")
        elif self.enabled:
            self.say(f"step {rec['step']}/{self._total}: loss {rec['loss']:.4f} accuracy {rec['accuracy']:.4f} "
                     f"{rec['tasks_per_s']:.1f} tasks/s lr {rec['lr']:.3g} ({rec['elapsed_s'] / 60:.1f} min)")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.enabled:
            self.say(line)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Logger:
    """Loss and accuracy summed on the device between log steps; every `every` steps (and at the
    last) one record: metrics.jsonl, W&B and the progress display."""

    def __init__(self, every: int, tasks: int, dist: Dist, metrics_file, tracker, progress: Progress, lr):
        self.every, self.tasks = every, tasks
        self.dist, self.file, self.tracker, self.progress, self.lr = dist, metrics_file, tracker, progress, lr
        self._reset()

    def _reset(self):
        self.loss = self.acc = 0.0
        self.n = self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, loss_sum, acc_sum, local_tasks: int):
        self.loss, self.acc = self.loss + loss_sum, self.acc + acc_sum
        self.n, self.steps = self.n + local_tasks, self.steps + 1

    def record(self, state: TrainState, last: bool, grad_norm) -> dict:
        if not (state.step % self.every == 0 or last):
            return {}
        dev = self.dist.device
        sums = self.dist.sum(torch.stack([torch.as_tensor(self.loss, device=dev, dtype=torch.float32),
                                          torch.as_tensor(self.acc, device=dev, dtype=torch.float32),
                                          torch.tensor(float(self.n), device=dev)])).tolist()
        if not math.isfinite(sums[0]):
            raise TrainError(f"step {state.step}: non-finite meta-loss")
        rec = {"step": state.step, "loss": sums[0] / sums[2], "accuracy": sums[1] / sums[2],
               "tasks_per_s": self.steps * self.tasks / (time.perf_counter() - self.t0), "lr": self.lr(),
               "grad_norm": float(grad_norm), "elapsed_s": state.elapsed}
        if dev.type == "cuda":
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        self._reset()
        self.progress.show(rec)
        return rec

    def write(self, rec: dict):
        if not rec:
            return
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        self.tracker.log({k: v for k, v in rec.items() if k != "step"}, rec["step"])


class Validator:
    """Every `train.val_every` steps (and at the last): accuracy on the fixed val episodes; the
    best weights go to best.safetensors."""

    def __init__(self, cfg: Config, dist: Dist, model, strategy: str, episodes, run_dir, progress: Progress):
        self.cfg, self.dist, self.model, self.strategy, self.episodes = cfg, dist, model, strategy, episodes
        self.best_path, self.progress = run_dir / "best.safetensors", progress

    def __call__(self, state: TrainState, last: bool, rec: dict) -> dict:
        if not (state.step % self.cfg.train.val_every == 0 or last):
            return rec
        v = evaluate(self.model, self.cfg, self.episodes, self.cfg.eval.val_inner_steps, self.dist.device,
                     self.strategy, self.dist)["accuracy"]
        if v > state.best_val:
            state.best_val, state.best_step = v, state.step
            if self.dist.is_main:
                save_weights(self.model, self.best_path, self.cfg, state.step, v)
        self.progress.write(f"step {state.step}: val accuracy {v:.4f} (best {state.best_val:.4f} at step {state.best_step})")
        return dict(rec or {"step": state.step, "elapsed_s": state.elapsed}, val_accuracy=v)


class BudgetSchedule:
    """train.budget_schedule: lay the step count (and the cosine) over train.max_minutes. The run
    times its steps from step 3 to `train.budget_probe` (the learning rate holds until then, so the
    count cannot change them) and one validation on a few val episodes; rank 0 turns these into
    the steps that fit the budget (3% spare; at most train.steps) and every rank takes that count.
    The timings are a machine fact, cached like the strategy (per CPU, torch, threads and the
    run's shape): the same command on the same machine gets the same count, hence the same
    weights. The count is recorded in <run>/schedule.json and in every checkpoint."""

    WARM = 3

    def __init__(self, t: TrainConfig, val_episodes: int, dist: Dist, shape: dict, run_dir: Path, evaluate_some, say):
        self.on, self.probe, self.t, self.val_episodes, self.dist, self.say = (
            t.budget_schedule, t.budget_probe, t, val_episodes, dist, say)
        self.shape = dict(shape, world=dist.world, meta_batch_size=t.meta_batch_size, val_every=t.val_every)
        self.path, self.evaluate_some = run_dir / "schedule.json", evaluate_some
        self.t0 = self.s0 = None

    def maybe_fix(self, state: TrainState) -> int | None:
        """Call after every step; returns the step count when it is fixed at this step."""
        if not self.on or state.schedule_steps:
            return None
        if self.t0 is None and state.step >= min(self.WARM, self.probe - 1):
            self.t0, self.s0 = time.perf_counter(), state.step
        if state.step < self.probe:
            return None
        rec = None
        if self.dist.is_main:
            timed = time.perf_counter() - self.t0, state.step - self.s0

            def measure():
                t = time.perf_counter()
                episodes = self.evaluate_some()
                val_s = (time.perf_counter() - t) * self.val_episodes / max(1, episodes) / self.dist.world
                return {"step_s": timed[0] / max(1, timed[1]), "val_s": val_s}
            rec = strategy_mod.cached("budget", self.shape, measure, self.say)
        rec = self.dist.broadcast_object(rec)
        t = self.t
        fit = int(60 * t.max_minutes * 0.97 / (rec["step_s"] + rec["val_s"] / t.val_every))
        steps = max(self.probe + 1, min(t.steps, fit))
        if self.dist.is_main:
            self.path.write_text(json.dumps(dict(rec, steps=steps, fits=fit), indent=1) + "\n")
            where = "cached" if rec.get("cached") else "measured"
            self.say(f"train.budget_schedule: {rec['step_s']:.3f} s/step and {rec['val_s']:.1f} s per validation ({where}"
                     f"{', ' + rec['cache'] if rec.get('cache') else ''}): {fit} steps fit "
                     f"{t.max_minutes:g} min; the schedule ends at step {steps}")
        state.schedule_steps = steps
        return steps


@dataclass
class Setup:
    """What set-up made, for the loop and `finish`."""
    cfg: Config
    dist: Dist
    model: torch.nn.Module
    run_dir: Path
    shards: str | Path
    tracker: object
    say: object
    start_step: int


def train(cfg: Config, log=print) -> dict:
    algorithms.check(cfg)           # the names the tables define, before anything starts
    models.check(cfg)
    dist = Dist(cfg.train.collective_timeout_s, cfg.train.threads)
    run = RunFolder(cfg, dist.is_main)
    try:
        with StopSignals() as signals:
            return _train(cfg, dist, run, signals, log if dist.is_main else (lambda *a, **k: None))
    finally:
        run.close()
        dist.close()


def _train(cfg: Config, dist: Dist, run: RunFolder, signals: StopSignals, say) -> dict:
    t, d = cfg.train, cfg.data
    local_tasks = config_mod.shares(t.meta_batch_size, dist.world)
    if t.debug:
        if dist.world > 1:
            raise ConfigError("train.debug runs a single process on one device; launch it without accelerate")
        torch.autograd.set_detect_anomaly(True)
        torch.use_deterministic_algorithms(True)
    failed = None
    if dist.is_main:                 # the run folder and the shards, then every rank goes on
        try:
            run.open()
            ensure(cfg, log=say)
        except Exception as e:
            failed = e
    if dist.broadcast_object(failed is not None):
        raise failed if failed is not None else TrainError("the main process could not set up the run (see its error)")
    for note in run.notes:
        say(note)
    if dist.elastic:
        e = dist.elastic
        say(f"torch elastic: run {e['run_id']}, restart {e['restart']} of at most {e['max_restarts']}, "
            f"{e['nodes']} node(s), {dist.world} process(es)")
    root = shards_dir(cfg)
    train_manifest = read_manifest(root, "train")
    image_shape = tuple(train_manifest["image_shape"])                    # the shape travels from the shards
    pretrain = algorithms.ALGORITHMS[cfg.algo.name].pretrain
    device = dist.device
    dist.seed(cfg.seed)
    # pre-training: a classifier over every train class; meta-learning: a head of data.ways (or one shared row)
    model = build_model(cfg, image_shape, ways=len(train_manifest["classes"]) if pretrain else None).to(device)
    if cfg.model.init:
        kept = load_init(model, cfg.model.init)
        say(f"model.init={cfg.model.init}: started from its tensors"
            + (f"; at their initialisation: {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}" if kept else ""))
    meta_step = MetaStep(cfg, model, dist, local_tasks, say, image_shape)
    ckpt = Checkpointer(run.dir, t.checkpoint_every, t.keep_checkpoints, dist.is_main)
    latest = None if cfg.run.fresh else ckpt.latest()
    if latest is not None:
        state = Checkpointer.restore(latest, model, meta_step.optimizer, meta_step.scheduler)
        say(f"resuming {run.dir} from {latest.name} (written by {state.world_size} process(es), now {dist.world})")
        if device.type == "cpu" and state.threads and state.threads != dist.threads:
            say(f"note: this launch runs {dist.threads} intra-op thread(s) per process, the checkpoint's {state.threads}: "
                "on a CPU the float32 rounding of the steps from here differs (set train.threads to keep it)")
    else:
        state = TrainState()
    decide_strategy(cfg, dist, run.dir, meta_step, state, say)
    state.reduce, state.tasks_per_chunk, state.threads = t.reduce, meta_step.chunk, dist.threads
    state.meta_batch_size, state.seed, state.world_size = t.meta_batch_size, cfg.seed, dist.world
    if state.step >= t.steps:
        say(f"{run.dir}: already trained {state.step} of {t.steps} steps")
    val_episodes = EpisodeSource(root, "val", cache_dir=d.cache_dir).all()
    train_split = EpisodeSource(root, "train", cfg.seed, d.cache_dir)
    resident = d.device_cache == "on" or (d.device_cache == "auto" and device.type == "cuda"
                                          and train_split.manifest["bytes"] < 4 * 2**30)
    stream = meta_batches(train_split, cfg.seed, t.meta_batch_size, dist.rank, dist.world, state.step, t.steps,
                          d.task_aug, d.num_workers, device=device if resident else None,
                          pretrain_group=d.ways * (d.shots + d.queries) if pretrain else 0)
    tracker = make_tracker(cfg, run.dir, dist.is_main)
    progress = Progress(t.steps, state.step, dist.is_main, say)
    logger = Logger(t.log_every, t.meta_batch_size, dist, run.metrics_log(state.step if latest else None), tracker,
                    progress, lambda: meta_step.scheduler.get_last_lr()[0])
    validator = Validator(cfg, dist, model, state.strategy, val_episodes, run.dir, progress)
    stop_votes = StopVotes(cfg, signals, dist.is_main, device)

    def evaluate_some() -> int:       # the budget schedule times one validation on a few episodes
        some = val_episodes[: 2 * cfg.eval.tasks_per_batch]
        evaluate(model, cfg, some, cfg.eval.val_inner_steps, device, state.strategy)
        return len(some)
    budget = BudgetSchedule(cfg.train, cfg.data.val_episodes, dist, meta_step.shape(), run.dir, evaluate_some, say)
    total = state.schedule_steps or t.steps
    meta_step.total_steps = total
    setup = Setup(cfg, dist, model, run.dir, root, tracker, say, state.step)
    say(f"training {cfg.algo.name} ({state.strategy}, reduce={t.reduce}, {meta_step.chunk} task(s) per chunk) on "
        f"{dist.world} process(es), {device}, {dist.threads} thread(s) each: {t.meta_batch_size} tasks/step "
        f"({local_tasks} per process), steps {state.step}..{t.steps}")
    start_wall, start_elapsed, start_step, stop = time.perf_counter(), state.elapsed, state.step, None
    stop_votes.clock = lambda: start_elapsed + time.perf_counter() - start_wall

    try:
        for batch in stream:                                       # ---- the loop ----
            step = batch.pop("step")
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss_sum, acc_sum, grad_norm, agreed = meta_step(step, batch, stop_votes.votes)
            state.step, state.tasks_seen = step + 1, state.tasks_seen + t.meta_batch_size
            state.elapsed = stop_votes.clock()
            if state.step == start_step + 1:
                say(f"first meta-step done {time.time() - LAUNCHED:.1f} s after launch")
            if (fixed := budget.maybe_fix(state)) is not None:
                total = meta_step.total_steps = progress.total = fixed
            stop = stop_votes.check(agreed, state.step)
            last = state.step >= total or stop is not None
            logger.add(loss_sum, acc_sum, local_tasks)
            logger.write(validator(state, last, logger.record(state, last, grad_norm)))
            if ckpt.due(state.step, last):
                ckpt.save(state, model, meta_step.optimizer, meta_step.scheduler, cfg)
                dist.barrier()   # no rank runs ahead of a checkpoint being written
            progress.update()
            if last:             # a stop vote, or the step count (the budget schedule's may end before the stream)
                break
    finally:
        progress.close()
        if logger.file:
            logger.file.close()
    if stop == "signal":
        tracker.finish()
        raise Preempted(f"stopped by {signals.received or 'a signal on another rank'} after step {state.step}: "
                        f"checkpoint {ckpt.dir / f'step_{state.step:06d}'} written; launch the same command again to resume")
    if stop == "time":
        say(f"train.max_minutes={t.max_minutes} reached at step {state.step}")
    return finish(setup, state)


def decide_strategy(cfg: Config, dist: Dist, run_dir: Path, meta_step: MetaStep, state: TrainState, say) -> None:
    """The strategy of this run: a resumed run keeps its checkpoint's (else the one its
    strategy.json recorded, for runs checkpointed before the state carried it); a new run asks
    metadist.strategy (rank 0 decides for every rank) and records what and why in strategy.json."""
    path = run_dir / "strategy.json"
    choice = None
    if dist.is_main:
        if state.strategy:
            choice = {"strategy": state.strategy, "why": state.strategy_why or "kept from the checkpoint"}
        elif state.step and path.is_file():
            choice = dict(json.loads(path.read_text()), why="kept from strategy.json")
        else:
            if cfg.train.debug:
                choice = {"strategy": "batched" if cfg.algo.strategy == "auto" else cfg.algo.strategy,
                          "why": "debug mode (the first step cross-checks it against the loop)"}
            else:
                choice = strategy_mod.choose(cfg.algo.strategy, dist.device, meta_step.shape(), meta_step.chunk_runner(), say)
            path.write_text(json.dumps(choice, indent=1) + "\n")
            say(choice["why"])
    choice = dist.broadcast_object(choice)
    meta_step.use_strategy(choice["strategy"])
    state.strategy, state.strategy_why = choice["strategy"], choice["why"]


def test_set_id(root) -> str:
    """16 hex digits naming the test episodes (from their shards' hashes): equal ids, same test."""
    m = read_manifest(root, "test")
    return hashlib.sha256("".join(s["sha256"] for s in m["shards"]).encode()).hexdigest()[:16]


def finish(setup: Setup, state: TrainState) -> dict:
    """Final weights, the best weights' test accuracy, summary.json."""
    cfg, dist, model, run_dir = setup.cfg, setup.dist, setup.model, setup.run_dir
    if dist.is_main:
        save_weights(model, run_dir / "model.safetensors", cfg, state.step)
    dist.barrier()
    best = run_dir / "best.safetensors"
    if best.is_file():
        model.load_state_dict(load_weights(best)[0])
    if algorithms.ALGORITHMS[cfg.algo.name].pretrain and dist.is_main:     # what `model.init` starts from
        save_weights(model, run_dir / "backbone.safetensors", cfg, state.best_step or state.step, state.best_val,
                     tensors=backbone_weights(model))
    test = EpisodeSource(setup.shards, "test", cache_dir=cfg.data.cache_dir).all(cfg.eval.test_episodes)
    r = evaluate(model, cfg, test, cfg.eval.inner_steps, dist.device, state.strategy, dist)
    summary = {"test_accuracy": r["accuracy"], "test_ci95": r["ci95"], "test_episodes": r["episodes"],
               "test_set": test_set_id(setup.shards), "test_inner_steps": cfg.eval.inner_steps,
               "best_val_accuracy": state.best_val, "best_step": state.best_step,
               "steps": state.step, "wall_time_s": state.elapsed, "tasks_per_s": state.tasks_seen / max(state.elapsed, 1e-9),
               "world_size": dist.world, "strategy": state.strategy, "reduce": state.reduce,
               "tasks_per_chunk": state.tasks_per_chunk, "threads": dist.threads, "algorithm": cfg.algo.name,
               "seed": cfg.seed, "data_seed": cfg.data.seed,
               "allreduce_ms_per_step": 1000 * dist.reduce_seconds / max(1, state.step - setup.start_step)}
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        setup.say(f"test accuracy {r['accuracy']:.4f} +- {r['ci95']:.4f} (95% CI, {r['episodes']} episodes, "
                  f"{cfg.eval.inner_steps} inner steps); {state.step} steps in {state.elapsed / 60:.1f} min")
        setup.tracker.summary(summary)
        if cfg.tracking.log_model:
            setup.tracker.log_model(run_dir / "model.safetensors")
    setup.tracker.finish()
    return summary
