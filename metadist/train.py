"""Meta-training: `train(cfg)` builds a `Trainer` and runs it. The Trainer builds every component
once, from its config section (the run folder and shards, the algorithm, the model, the optimizer
and the `Schedule`, the `MetaStep`, the `CheckpointManager` over the stateful parts, the train
stream, the logger, the validator, the stop votes); then `fit()` is a flat loop in which each
component decides when it acts. The ranks agree on when to stop (the step count,
`train.max_minutes`, a preemption signal) through votes that ride the gradient reduction, so no
step has a collective or a host sync of its own.

Run folder <run.root>/<run.name> (run_folder.py): config.yaml, metrics.jsonl, checkpoints/,
best.safetensors, model.safetensors, summary.json, strategy.json, schedule.json (with
train.budget_schedule), the algorithm's own outputs (pretrain: backbone.safetensors) and W&B's
offline files. Launching again on an existing run folder resumes from its latest complete
checkpoint, with any number of processes (run.fresh=true starts over). Progress: a bar on a
terminal; one plain line per log step when stderr is a file (SLURM's .out, `kubectl logs`, CI).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from metadist import LAUNCHED, algorithms, models
from metadist import config as config_mod
from metadist import strategy as strategy_mod
from metadist.checkpoint import (
    CheckpointManager,
    Parts,
    TrainState,
    load_init,
    load_weights,
    save_weights,
)
from metadist.config import Config, ConfigError
from metadist.data.prepare import ensure, shards_dir
from metadist.data.store import Access, ShardError, mapped_fault, read_manifest
from metadist.data.stream import EpisodeSource, Prefetch, StreamSpec, fits_device
from metadist.distributed import Dist
from metadist.errors import Preempted
from metadist.evaluate import evaluate
from metadist.models import build_model
from metadist.run_folder import RunFolder
from metadist.schedule import BudgetFit
from metadist.signals import StopSignals
from metadist.step import TrainError
from metadist.step import from_config as step_from_config
from metadist.tracking import make_tracker

__all__ = ["TrainError", "TrainState", "Trainer", "train"]


class StopVotes:
    """Whether to stop after this step, agreed by all ranks: each rank votes (rank 0 for the
    wall-clock bound `limit_s`; every rank for a signal it received, and for a shard changed under
    it: `fault()` names one); the votes are summed or averaged in the gradient reduction and read
    on the host every `every` steps (the same steps on every rank, so all stop at the same one,
    and all know why)."""

    def __init__(
        self, limit_s: float, every: int, signals: StopSignals, device: torch.device, fault
    ):
        self.limit, self.every, self.signals, self.pending = limit_s, every, signals, None
        self.fault, self.faulted = fault, None
        self.clock = lambda: math.inf  # set by the loop: the run's training time so far
        # every possible vote (time, signal, fault), already on the device: picking one is a
        # view, never a host->device copy
        self.table = torch.tensor(
            [[float(b) for b in (k & 4, k & 2, k & 1)] for k in range(8)], device=device
        ).clamp_(max=1)

    def votes(self) -> torch.Tensor:
        self.faulted = self.faulted or self.fault()
        time_up = self.clock() >= self.limit
        return self.table[
            4 * time_up + 2 * (self.signals.received is not None) + (self.faulted is not None)
        ]

    def check(self, agreed: torch.Tensor, step: int) -> str | None:
        """None, "time", "signal" or "fault" (a shard changed under some rank; it wins)."""
        self.pending = agreed if self.pending is None else torch.maximum(self.pending, agreed)
        if step % self.every:
            return None
        time_vote, signal_vote, fault_vote = self.pending.tolist()
        self.pending = None
        if fault_vote > 0:
            return "fault"
        return "signal" if signal_vote > 0 else "time" if time_vote > 0 else None


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise one plain line per log record (a bar
    redrawn with \\r every step makes a log file one unreadable line). Main process only.
    `total()` is the schedule's step count (it may be fixed after the first steps)."""

    def __init__(self, total, initial: int, enabled: bool, say):
        self.total, self.say, self.enabled = total, say, enabled
        self.bar = (
            tqdm(total=total(), initial=initial, dynamic_ncols=True, file=sys.stderr)
            if enabled and sys.stderr.isatty()
            else None
        )

    def show(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{rec['loss']:.3f}",
                acc=f"{rec['accuracy']:.3f}",
                tps=f"{rec['tasks_per_s']:.0f}",
            )
        elif self.enabled:
            self.say(
                f"step {rec['step']}/{self.total()}: loss {rec['loss']:.4f} accuracy "
                f"{rec['accuracy']:.4f} "
                f"{rec['tasks_per_s']:.1f} tasks/s lr {rec['lr']:.3g} ({rec['elapsed_s'] / 60:.1f} "
                "min)"
            )

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.enabled:
            self.say(line)

    def update(self) -> None:
        if self.bar is not None:
            if self.bar.total != self.total():
                self.bar.total = self.total()
                self.bar.refresh()
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Logger:
    """Loss and accuracy summed on the device between log steps; every `every` steps (and at the
    last) one record: metrics.jsonl (its file, opened by `open`), W&B and the progress display."""

    def __init__(self, every: int, tasks: int, dist: Dist, tracker, progress: Progress, lr):
        self.every, self.tasks, self.dist, self.tracker, self.progress, self.lr = (
            every,
            tasks,
            dist,
            tracker,
            progress,
            lr,
        )
        self.file = None
        self._reset()

    def open(self, path: Path, resumed_step: int | None) -> None:
        """metrics.jsonl, for appending; on resume, records past the checkpoint's step are dropped;
        a run that never checkpointed starts it anew."""
        if path.exists():
            if resumed_step is None:
                path.unlink()
            else:
                kept = [
                    ln
                    for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resumed_step
                ]
                path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(path, "a")  # noqa: SIM115 (open for the whole run; closed by close())

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None

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
        sums = self.dist.sum(
            torch.stack(
                [
                    torch.as_tensor(self.loss, device=dev, dtype=torch.float32),
                    torch.as_tensor(self.acc, device=dev, dtype=torch.float32),
                    torch.tensor(float(self.n), device=dev),
                ]
            )
        ).tolist()
        if not math.isfinite(sums[0]):
            raise TrainError(f"step {state.step}: non-finite meta-loss")
        rec = {
            "step": state.step,
            "loss": sums[0] / sums[2],
            "accuracy": sums[1] / sums[2],
            "tasks_per_s": self.steps * self.tasks / (time.perf_counter() - self.t0),
            "lr": self.lr(),
            "grad_norm": float(grad_norm),
            "elapsed_s": state.elapsed,
        }
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
    """Every `every` steps (and at the last): `measure()` (the accuracy on the fixed val
    episodes); the best weights go to the main process's `save_best(step, accuracy)`."""

    def __init__(self, every: int, measure, save_best, is_main: bool, progress: Progress):
        self.every, self.measure, self.save_best, self.is_main, self.progress = (
            every,
            measure,
            save_best,
            is_main,
            progress,
        )

    def __call__(self, state: TrainState, last: bool, rec: dict) -> dict:
        if not (state.step % self.every == 0 or last):
            return rec
        v = self.measure()
        if v > state.best_val:
            state.best_val, state.best_step = v, state.step
            if self.is_main:
                self.save_best(state.step, v)
        self.progress.write(
            f"step {state.step}: val accuracy {v:.4f} (best {state.best_val:.4f} at step "
            f"{state.best_step})"
        )
        return dict(rec or {"step": state.step, "elapsed_s": state.elapsed}, val_accuracy=v)


def train(cfg: Config, log=print) -> dict:
    algorithms.check(cfg.algo)  # the names the tables define, before anything starts
    models.check(cfg.model)
    dist = Dist(cfg.train.collective_timeout_s, cfg.train.threads)
    run = RunFolder(cfg.run, config_mod.to_yaml(cfg), dist.is_main)
    try:
        with StopSignals() as signals:
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
        self._restore()
        self._build_loop()

    # ---- set-up ----
    def _open(self, run: RunFolder) -> None:
        """Debug switches, the run folder and the shards (main process), then every rank goes on."""
        t = self.cfg.train
        if t.debug:
            if self.dist.world > 1:
                raise ConfigError(
                    "train.debug runs a single process on one device; launch it without accelerate"
                )
            torch.autograd.set_detect_anomaly(True)
            torch.use_deterministic_algorithms(True)
        failed = None
        if self.dist.is_main:
            try:
                run.open()
                ensure(self.cfg.data, log=self.say)
            except Exception as e:
                failed = e
        if self.dist.broadcast_object(failed is not None):
            raise (
                failed
                if failed is not None
                else TrainError("the main process could not set up the run (see its error)")
            )
        for note in run.notes:
            self.say(note)
        if e := self.dist.elastic:
            self.say(
                f"torch elastic: run {e['run_id']}, restart {e['restart']} of at most "
                f"{e['max_restarts']}, "
                f"{e['nodes']} node(s), {self.dist.world} process(es)"
            )
        self.root = shards_dir(self.cfg.data)
        self.access = Access.of(self.cfg.data, self.say)
        self.train_manifest = read_manifest(self.root, "train")
        # the shape travels from the shards
        self.image_shape = tuple(self.train_manifest["image_shape"])

    def _build_model(self) -> None:
        """The algorithm's class, the model its head needs (initialised from the run's seed, or
        from model.init)."""
        cfg = self.cfg
        self.algo_class = algorithms.get(cfg.algo)
        self.dist.seed(cfg.seed)
        rows = self.algo_class.head_rows(
            cfg.algo, cfg.data.ways, len(self.train_manifest["classes"])
        )
        self.model = build_model(cfg.model, cfg.algo, self.image_shape, rows).to(self.device)
        if cfg.model.init:
            kept = load_init(self.model, cfg.model.init)
            self.say(
                f"model.init={cfg.model.init}: started from its tensors"
                + (
                    "; at their initialisation: "
                    f"{', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}"
                    if kept
                    else ""
                )
            )

    def _build_step(self) -> None:
        """The meta-step, with the optimizer, the schedule and the algorithm it steps with."""
        self.meta_step = step_from_config(
            self.cfg, self.model, self.dist, self.local_tasks, self.say
        )
        self.optimizer, self.schedule = self.meta_step.optimizer, self.meta_step.schedule
        self.settings, self.algorithm = self.meta_step.s, self.meta_step.algorithms[False]

    def _restore(self) -> None:
        """The latest checkpoint (unless run.fresh), the strategy, and what this launch records."""
        cfg, t, dist = self.cfg, self.cfg.train, self.dist
        self.state = TrainState()
        self.checkpoints = CheckpointManager(
            self.run_dir,
            t.checkpoint_every,
            t.keep_checkpoints,
            dist.is_main,
            Parts(self.model, self.optimizer, self.schedule, self.state),
            self.config,
        )
        self.resumed = None if cfg.run.fresh else self.checkpoints.restore()
        if self.resumed is not None:
            self.say(
                f"resuming {self.run_dir} from {self.resumed.name} (written by "
                f"{self.state.world_size} "
                f"process(es), now {dist.world})"
            )
            if (
                self.device.type == "cpu"
                and self.state.threads
                and self.state.threads != dist.threads
            ):
                self.say(
                    f"note: this launch runs {dist.threads} intra-op thread(s) per process, the "
                    "checkpoint's "
                    f"{self.state.threads}: on a CPU the float32 rounding of the steps from here "
                    "differs "
                    "(set train.threads to keep it)"
                )
        self._decide_strategy()
        s = self.state
        s.reduce, s.tasks_per_chunk, s.threads = t.reduce, self.settings.chunk, dist.threads
        s.meta_batch_size, s.seed, s.world_size = t.meta_batch_size, cfg.seed, dist.world
        if s.step >= t.steps:
            self.say(f"{self.run_dir}: already trained {s.step} of {t.steps} steps")

    def _decide_strategy(self) -> None:
        """A resumed run keeps its checkpoint's strategy (else the one its strategy.json recorded,
        for runs checkpointed before the state carried it); a new run asks metadist.strategy (rank 0
        decides for every rank) and records what and why in strategy.json."""
        path, state, choice = self.run_dir / "strategy.json", self.state, None
        if self.dist.is_main:
            if state.strategy:
                choice = {
                    "strategy": state.strategy,
                    "why": state.strategy_why or "kept from the checkpoint",
                }
            elif state.step and path.is_file():
                choice = dict(json.loads(path.read_text()), why="kept from strategy.json")
            else:
                choice = self._new_strategy()
                path.write_text(json.dumps(choice, indent=1) + "\n")
                self.say(choice["why"])
        choice = self.dist.broadcast_object(choice)
        self.meta_step.use_strategy(choice["strategy"])
        state.strategy, state.strategy_why = choice["strategy"], choice["why"]

    def _new_strategy(self) -> dict:
        a, d = self.cfg.algo, self.cfg.data
        if self.cfg.train.debug:
            return {
                "strategy": "batched" if a.strategy == "auto" else a.strategy,
                "why": "debug mode (the first step cross-checks it against the loop)",
            }
        runner = self.meta_step.chunk_runner((d.ways, d.shots, d.queries), self.image_shape)
        return strategy_mod.choose(a.strategy, self.device, self.chunk_shape(), runner, self.say)

    def chunk_shape(self) -> dict:
        """What decides a chunk's speed (the strategy and budget caches' key, with the machine)."""
        c, a, d = self.cfg, self.cfg.algo, self.cfg.data
        return {
            "model": c.to_dict()["model"],
            "image": list(self.image_shape),
            "ways": d.ways,
            "shots": d.shots,
            "queries": d.queries,
            "algo": a.name,
            "second_order": self.meta_step.second_order,
            "inner_steps": a.inner_steps,
            "learn_inner_lr": a.learn_inner_lr,
            "per_step_bn": a.per_step_bn,
            "tasks_per_chunk": self.settings.chunk,
            "head_init": self.algorithm.train_inner.head_init,
            "device": self.device.type,
        }

    def _build_stream(self):
        """This rank's training batches from the resumed step (the algorithm says which), the train
        split resident on the device when data.device_cache says so."""
        cfg, t, d, dist = self.cfg, self.cfg.train, self.cfg.data, self.dist
        train_split = EpisodeSource(self.root, "train", cfg.seed, self.access)
        nbytes = train_split.manifest["bytes"]
        resident = fits_device(nbytes, self.device, d.device_cache, d.device_cache_fraction)
        spec = StreamSpec(
            cfg.seed,
            t.meta_batch_size,
            dist.rank,
            dist.world,
            self.state.step,
            t.steps,
            d.task_aug,
            d.num_workers,
            self.device if resident else None,
        )
        stream = self.algorithm.stream(train_split, spec)
        # too big to keep on the GPU: gathered on the host, copied one step ahead
        return (
            Prefetch(stream, self.device) if self.device.type == "cuda" and not resident else stream
        )

    def _build_loop(self) -> None:
        """The stream, the logger, the validator, the stop votes, the budget."""
        cfg, t, d, dist = self.cfg, self.cfg.train, self.cfg.data, self.dist
        self.val_episodes = EpisodeSource(self.root, "val", access=self.access).all()
        self.stream = self._build_stream()
        self.tracker = make_tracker(
            cfg.tracking, cfg.run.name, self.config, self.run_dir, dist.is_main
        )
        self.progress = Progress(
            lambda: self.schedule.total, self.state.step, dist.is_main, self.say
        )
        self.logger = Logger(
            t.log_every, t.meta_batch_size, dist, self.tracker, self.progress, self.schedule.lr
        )
        if dist.is_main:
            self.logger.open(
                self.run_dir / "metrics.jsonl", self.state.step if self.resumed else None
            )
        self.validator = Validator(
            t.val_every,
            lambda: self.evaluate(self.val_episodes, cfg.eval.val_inner_steps, dist),
            self._save_best,
            dist.is_main,
            self.progress,
        )
        self.stop = StopVotes(
            60 * t.max_minutes if dist.is_main and t.max_minutes else math.inf,
            t.sync_every or (10 if self.device.type == "cuda" else 1),
            self.signals,
            self.device,
            mapped_fault,
        )
        self.budget = BudgetFit(
            t, d.val_episodes, self.chunk_shape(), dist, self.run_dir, self._evaluate_some, self.say
        )

    # ---- pieces the components call ----
    def evaluate(self, episodes, steps: int, dist=None) -> float:
        inner = self.algorithm.test_inner(steps, self.cfg.algo.inner_lr, self.model.head_names())
        return evaluate(
            self.model,
            episodes,
            inner,
            self.cfg.eval.tasks_per_batch,
            self.device,
            self.state.strategy,
            dist,
        )["accuracy"]

    def _evaluate_some(self) -> int:
        """One validation on a few val episodes (the budget schedule times it)."""
        some = self.val_episodes.first(2 * self.cfg.eval.tasks_per_batch)
        self.evaluate(some, self.cfg.eval.val_inner_steps)
        return len(some)

    def _save_best(self, step: int, accuracy: float) -> None:
        save_weights(self.model, self.run_dir / "best.safetensors", self.config, step, accuracy)

    # ---- the loop ----
    def fit(self) -> dict:
        t, state, device = self.cfg.train, self.state, self.device
        self.say(
            f"training {self.cfg.algo.name} ({state.strategy}, reduce={t.reduce}, "
            f"{self.settings.chunk} task(s) "
            f"per chunk) on {self.dist.world} process(es), {device}, {self.dist.threads} thread(s) "
            "each: "
            f"{t.meta_batch_size} tasks/step ({self.local_tasks} per process), steps "
            f"{state.step}..{t.steps}"
        )
        start_wall, start_elapsed, self.start_step, stop = (
            time.perf_counter(),
            state.elapsed,
            state.step,
            None,
        )
        self.stop.clock = lambda: start_elapsed + time.perf_counter() - start_wall
        try:
            for batch in self.stream:
                step = batch.pop("step")
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss_sum, acc_sum, grad_norm, agreed = self.meta_step(step, batch, self.stop.votes)
                state.step, state.tasks_seen = step + 1, state.tasks_seen + t.meta_batch_size
                state.elapsed = self.stop.clock()
                if state.step == self.start_step + 1:
                    self.say(f"first meta-step done {time.time() - LAUNCHED:.1f} s after launch")
                self.budget.maybe_fix(state.step, self.schedule)
                stop = self.stop.check(agreed, state.step)
                last = state.step >= self.schedule.total or stop is not None
                self.logger.add(loss_sum, acc_sum, self.local_tasks)
                self.logger.write(
                    self.validator(state, last, self.logger.record(state, last, grad_norm))
                )
                if self.checkpoints.due(state.step, last):
                    self.checkpoints.save(state.step)
                    self.dist.barrier()  # no rank runs ahead of a checkpoint being written
                self.progress.update()
                # a stop vote, or the step count (the budget's may end before the stream)
                if last:
                    break
        finally:
            self.progress.close()
            self.logger.close()
        return self._stopped(stop)

    def _stopped(self, stop: str | None) -> dict:
        if stop in ("signal", "fault"):
            self.tracker.finish()
            path = self.checkpoints.dir / f"step_{self.state.step:06d}"
        if stop == "fault":
            what = (
                self.stop.faulted or self.stop.fault() or "a pool shard changed under another rank"
            )
            raise ShardError(
                f"{what}: stopped after step {self.state.step}, checkpoint {path} written; put the "
                "shard back (`metadist verify` checks it) and launch again"
            )
        if stop == "signal":
            raise Preempted(
                f"stopped by {self.signals.received or 'a signal on another rank'} after step "
                f"{self.state.step}: checkpoint {path} written; launch the same command again to "
                "resume"
            )
        if stop == "time":
            self.say(
                f"train.max_minutes={self.cfg.train.max_minutes} reached at step {self.state.step}"
            )
        return self.finish()

    def finish(self) -> dict:
        """Final weights, the algorithm's outputs, the best weights' test accuracy, summary.json."""
        cfg, dist, state = self.cfg, self.dist, self.state
        if dist.is_main:
            save_weights(self.model, self.run_dir / "model.safetensors", self.config, state.step)
        dist.barrier()
        best = self.run_dir / "best.safetensors"
        if best.is_file():
            self.model.load_state_dict(load_weights(best)[0])
        if dist.is_main:
            for name, tensors in self.algorithm.outputs(self.model).items():
                save_weights(
                    self.model,
                    self.run_dir / name,
                    self.config,
                    state.best_step or state.step,
                    state.best_val,
                    tensors=tensors,
                )
        test = EpisodeSource(self.root, "test", access=self.access).all(cfg.eval.test_episodes)
        inner = self.algorithm.test_inner(
            cfg.eval.inner_steps, cfg.algo.inner_lr, self.model.head_names()
        )
        r = evaluate(
            self.model, test, inner, cfg.eval.tasks_per_batch, self.device, state.strategy, dist
        )
        summary = self._summary(r)
        if dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            self.say(
                f"test accuracy {r['accuracy']:.4f} +- {r['ci95']:.4f} (95% CI, {r['episodes']} "
                "episodes, "
                f"{cfg.eval.inner_steps} inner steps); {state.step} steps in "
                f"{state.elapsed / 60:.1f} min"
            )
            self.tracker.summary(summary)
            if cfg.tracking.log_model:
                self.tracker.log_model(self.run_dir / "model.safetensors")
        self.tracker.finish()
        return summary

    def _summary(self, r: dict) -> dict:
        cfg, dist, s = self.cfg, self.dist, self.state
        return {
            "test_accuracy": r["accuracy"],
            "test_ci95": r["ci95"],
            "test_episodes": r["episodes"],
            "test_set": test_set_id(self.root),
            "test_inner_steps": cfg.eval.inner_steps,
            "best_val_accuracy": s.best_val,
            "best_step": s.best_step,
            "steps": s.step,
            "wall_time_s": s.elapsed,
            "tasks_per_s": s.tasks_seen / max(s.elapsed, 1e-9),
            "world_size": dist.world,
            "strategy": s.strategy,
            "reduce": s.reduce,
            "tasks_per_chunk": s.tasks_per_chunk,
            "threads": dist.threads,
            "algorithm": cfg.algo.name,
            "seed": cfg.seed,
            "data_seed": cfg.data.seed,
            "allreduce_ms_per_step": 1000 * dist.reduce_seconds / max(1, s.step - self.start_step),
        }


def test_set_id(root) -> str:
    """16 hex digits naming the test episodes (from their shards' hashes): equal ids, same test."""
    m = read_manifest(root, "test")
    return hashlib.sha256("".join(s["sha256"] for s in m["shards"]).encode()).hexdigest()[:16]
