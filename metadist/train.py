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
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from metadist import LAUNCHED, algorithms, machine, models
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
from metadist.data.prepare import ensure, shards_dir
from metadist.data.store import Access, ShardError, mapped_fault, read_manifest
from metadist.data.stream import (
    EpisodeSource,
    Prefetch,
    StreamSpec,
    fits_device,
    open_sources,
    pad_batch,
    source_names,
)
from metadist.distributed import Dist
from metadist.errors import Preempted
from metadist.evaluate import evaluate, format_table, source_table
from metadist.models import build_model
from metadist.run_folder import RunFolder
from metadist.schedule import BudgetFit, ProbeWork
from metadist.signals import StopSignals
from metadist.step import Ask, Learner, MetaStep, Plan, StepSettings, TrainError, decide, runner
from metadist.step.compute import sample_chunk, strategy
from metadist.step.plan import candidates
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

    def __init__(
        self, every: int, tasks: int, dist: Dist, tracker, progress: Progress, lr, names=()
    ):
        """names: the sources' names, when a run has many (per-source accuracy)."""
        self.every, self.tasks, self.dist, self.tracker, self.progress, self.lr = (
            every,
            tasks,
            dist,
            tracker,
            progress,
            lr,
        )
        self.names = list(names)
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
                # replaced whole, never truncated in place: a reader (metadist plot, a tail, a
                # launcher's health check) sees the old file or the new one, never an empty one
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_text("".join(ln + "\n" for ln in kept))
                os.replace(tmp, path)
        self.file = open(path, "a")  # noqa: SIM115 (open for the whole run; closed by close())

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None

    def _reset(self):
        self.loss = self.acc = self.per_source = 0.0
        self.n = self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, loss_sum, acc_sum, local_tasks: int, source=None):
        """A step's sums (meta_backward's); `source`: the batch's one-hot sources (many sources:
        acc_sum is then the total and each source's)."""
        self.loss, self.acc = self.loss + loss_sum, self.acc + acc_sum
        self.n, self.steps = self.n + local_tasks, self.steps + 1
        if source is not None:
            self.per_source = self.per_source + source.sum(0)

    def record(self, state: TrainState, last: bool, grad_norm) -> dict:
        if not (state.step % self.every == 0 or last):
            return {}
        dev = self.dist.device
        acc = torch.as_tensor(self.acc, device=dev, dtype=torch.float32).reshape(-1)
        sums = self.dist.sum(
            torch.cat(
                [
                    torch.as_tensor(self.loss, device=dev, dtype=torch.float32).reshape(1),
                    acc,
                    torch.tensor([float(self.n)], device=dev),
                    torch.as_tensor(self.per_source, device=dev, dtype=torch.float32).reshape(-1),
                ]
            )
        ).tolist()
        if not math.isfinite(sums[0]):
            raise TrainError(f"step {state.step}: non-finite meta-loss")
        n = sums[len(acc) + 1]
        rec = {
            "step": state.step,
            "loss": sums[0] / n,
            "accuracy": sums[1] / n,
            "tasks_per_s": self.steps * self.tasks / (time.perf_counter() - self.t0),
            "lr": self.lr(),
            "grad_norm": float(grad_norm),
            "elapsed_s": state.elapsed,
        }
        if self.names:  # many sources: each one's training accuracy (of the tasks it gave)
            per_acc, counts = sums[2 : len(acc) + 1], sums[len(acc) + 2 :]
            for name, a, c in zip(self.names, per_acc, counts):
                rec[f"accuracy/{name}"] = a / c if c else None
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
        self.tracker.log(
            {k: v for k, v in rec.items() if k != "step" and v is not None}, rec["step"]
        )


class Validator:
    """Every `every` steps (and at the last): `measure()` ({"val_accuracy": the accuracy on the
    fixed val episodes, and any per-source figures}); the best weights go to the main process's
    `save_best(step, accuracy)`."""

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
        measured = self.measure()
        v = measured["val_accuracy"]
        if v > state.best_val:
            state.best_val, state.best_step = v, state.step
            if self.is_main:
                self.save_best(state.step, v)
        self.progress.write(
            f"step {state.step}: val accuracy {v:.4f} (best {state.best_val:.4f} at step "
            f"{state.best_step})"
        )
        return dict(rec or {"step": state.step, "elapsed_s": state.elapsed}, **measured)


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
        """Debug switches, the run folder and the shards (main process), then every rank goes on."""
        t = self.cfg.train
        if t.debug:
            if self.dist.world > 1:
                raise ConfigError(
                    "train.debug runs a single process on one device; launch it without accelerate"
                )
            torch.autograd.set_detect_anomaly(True)
            torch.use_deterministic_algorithms(True)
        d = self.cfg.data
        # the shards (many sources: data.sources, named for the tables)
        self.roots = list(d.sources) or [shards_dir(d)]
        self.root, self.names = self.roots[0], source_names(d.sources) if d.sources else []
        failed = None
        if self.dist.is_main:
            try:
                if self.names:  # many sources, each prepared on its own: they mix, or nothing
                    self._check_sources(open_sources(self.roots, "train"))
                run.open()
                if self.names:
                    self._record_sources()
                else:
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
        self.access = Access.of(d, self.say)
        self.train_splits = open_sources(self.roots, "train", self.cfg.seed, self.access)
        self.train_split = self.train_splits[0]
        self.train_manifest = self.train_split.manifest
        # the shape travels from the shards
        self.image_shape = tuple(self.train_manifest["image_shape"])

    def _check_sources(self, splits: list) -> None:
        """Many sources: their images have the shape the config says (its weights files carry
        it), and their episodes suit the algorithm."""
        d, first = self.cfg.data, splits[0]
        want = (d.channels, d.image_size, d.image_size)
        if first.image_shape != want:
            raise ConfigError(
                f"data.sources: images of shape {list(first.image_shape)}, data.channels and "
                f"data.image_size say {list(want)}: set them to the sources'"
            )
        if first.variable and (
            problem := algorithms.get(self.cfg.algo).variable_problem(self.cfg.algo)
        ):
            raise ConfigError(problem)

    def _record_sources(self) -> None:
        """sources.json in the run folder (main process): each source's root, weight and
        manifests; a run launched again on sources whose shards changed is refused."""
        d, record = self.cfg.data, {}
        weights = d.source_weights or [1.0] * len(self.roots)
        for name, root, w in zip(self.names, self.roots, weights):
            splits = {s: read_manifest(root, s) for s in ("train", "val", "test")}
            record[name] = {"root": str(root), "weight": w, "manifests": splits}
        path = self.run_dir / "sources.json"
        if path.is_file():
            old = json.loads(path.read_text())
            for name, r in record.items():
                if old.get(name, {}).get("manifests") != r["manifests"]:
                    raise ConfigError(
                        f"data.sources: {name} ({r['root']}) is not the shards this run started "
                        f"on ({path} records them): put them back, or start another run.name"
                    )
        else:
            path.write_text(json.dumps(record, indent=1) + "\n")
        self.say(
            f"{len(self.roots)} sources, each task's drawn by weight: "
            + ", ".join(f"{n} {w / sum(weights):.2f}" for n, w in zip(self.names, weights))
        )

    def _build_model(self) -> None:
        """The algorithm's class, the model its head needs (initialised from the run's seed, or
        from model.init)."""
        cfg = self.cfg
        self.algo_class = algorithms.get(cfg.algo)
        if self.train_split.variable and (problem := self.algo_class.variable_problem(cfg.algo)):
            raise ConfigError(problem)
        if self.names and (problem := self.algo_class.sources_problem(cfg.algo)):
            raise ConfigError(problem)
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
        """What the step trains with, the checkpoint, the plan, then the step, built once."""
        self.learner = Learner.of(self.cfg, self.model, self.device)
        self.optimizer, self.schedule = self.learner.optimizer, self.learner.schedule
        self.algorithm = self.learner.algorithms[False]
        self._restore()
        self.plan = self._plan()
        settings = StepSettings.of(self.cfg, self.local_tasks, self.device)
        self.meta_step = MetaStep(self.learner, self.dist, self.plan, settings, self.say)
        if self.state.step >= self.cfg.train.steps:
            self.say(
                f"{self.run_dir}: already trained {self.state.step} of {self.cfg.train.steps} steps"
            )

    def _restore(self) -> None:
        """The latest checkpoint (unless run.fresh), and what this launch records."""
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
        s = self.state
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
        s.threads, s.meta_batch_size, s.seed = dist.threads, t.meta_batch_size, cfg.seed
        s.world_size = dist.world

    def _plan(self) -> Plan:
        """A resumed run keeps its checkpoint's plan (else its strategy.json's); a new run's is
        decided by rank 0 for every rank and recorded in strategy.json. Exact mode then checks
        that every rank runs the same kernels."""
        path, state, plan, failed = self.run_dir / "strategy.json", self.state, None, None
        if self.dist.is_main:
            try:
                if state.plan:
                    plan = Plan.of_record(state.plan)
                elif state.step and path.is_file() and "at_once" in json.loads(path.read_text()):
                    plan = Plan.of_record(json.loads(path.read_text()))
                else:
                    plan = self._new_plan()
                    path.write_text(json.dumps(plan.record(), indent=1) + "\n")
                    self.say(plan.why)
            except ConfigError as e:
                failed = str(e)
        plan, failed = self.dist.broadcast_object((plan, failed))
        if failed:
            raise ConfigError(failed)
        if plan.reduce == "exact":
            self._check_kernels()
        state.plan = plan.record()
        return plan

    def _check_kernels(self) -> None:
        """Exact mode: a group's gradient has the same bits on every rank only where the ranks
        run the same kernels; ranks that do not are refused in one line."""
        every = self.dist.gather_objects(machine.kernels())
        for rank, k in enumerate(every):
            diff = {key: (every[0][key], v) for key, v in k.items() if every[0][key] != v}
            if diff:
                said = "; ".join(
                    f"{key} {a} on rank 0, {b} on rank {rank}" for key, (a, b) in diff.items()
                )
                raise ConfigError(
                    f"train.reduce=exact: the ranks run different kernels ({said}), so a group's "
                    "gradient would depend on the rank that computes it: set ONEDNN_MAX_CPU_ISA, "
                    "ATEN_CPU_CAPABILITY (and train.threads) to what every node supports, or use "
                    "train.reduce=fast"
                )

    def _ask(self) -> Ask:
        a, t, m = self.cfg.algo, self.cfg.train, self.cfg.model
        variable = self.train_split.variable
        cannot = (
            "DropBlock draws its masks on the host each step"
            if m.dropblock
            else "variable episodes change shape every step"
            if variable
            else "many sources change the episode shape every step"
            if self.names
            else ""
        )
        return Ask(
            a.strategy, a.tasks_per_chunk, t.reduce, a.compile, t.meta_batch_size, self.dist.world,
            t.exact_processes, self.device.type, cannot, t.debug, variable,
        )  # fmt: skip

    def _new_plan(self) -> Plan:
        """The plan of a new run; auto on a CPU measures on the run's own episodes (variable
        ones: its first, padded as a chunk is) or a sample of its shape."""
        ask, d, split = self._ask(), self.cfg.data, self.train_split
        n = max(candidates(ask))
        sample = {}

        def run(size: int) -> int:
            if not sample:
                batch = (
                    pad_batch(split.records_at(range(n)), split.gather)
                    if split.variable
                    else sample_chunk((d.ways, d.shots, d.queries), self.image_shape, n)
                )
                sample["run"] = runner(self.learner, batch, self.device)
            return sample["run"](size)

        return decide(ask, run, self.chunk_shape(), self.say)

    def chunk_shape(self) -> dict:
        """What decides a chunk's speed (the strategy and budget caches' key, with the machine)."""
        c, a, d = self.cfg, self.cfg.algo, self.cfg.data
        episode = {"ways": d.ways, "shots": d.shots, "queries": d.queries}
        if self.train_split.variable:
            episode = {"episode": "variable", **c.to_dict()["data"]["variable"]}
        return {
            "model": c.to_dict()["model"],
            "image": list(self.image_shape),
            **episode,
            "algo": a.name,
            "second_order": self.learner.second_order,
            "inner_steps": a.inner_steps,
            "learn_inner_lr": a.learn_inner_lr,
            "per_step_bn": a.per_step_bn,
            "tasks_per_chunk": a.tasks_per_chunk,
            "compile": a.compile,
            "reduce": c.train.reduce,
            "head_init": self.algorithm.train_inner.head_init,
            "device": self.device.type,
        }

    def _build_stream(self):
        """This rank's training batches from the resumed step (the algorithm says which), the train
        split resident on the device when data.device_cache says so."""
        cfg, t, d, dist = self.cfg, self.cfg.train, self.cfg.data, self.dist
        train_split = self.train_split
        nbytes = train_split.manifest["bytes"]
        resident = (
            not train_split.variable
            and not self.names
            and fits_device(nbytes, self.device, d.device_cache, d.device_cache_fraction)
        )
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
            tuple(d.source_weights),
        )
        stream = self.algorithm.stream(self.train_splits if self.names else train_split, spec)
        # too big to keep on the GPU: gathered on the host, copied one step ahead
        return (
            Prefetch(stream, self.device) if self.device.type == "cuda" and not resident else stream
        )

    def _build_loop(self) -> None:
        """The stream, the logger, the validator, the stop votes, the budget."""
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
            t.log_every,
            t.meta_batch_size,
            dist,
            self.tracker,
            self.progress,
            self.schedule.lr,
            self.names,
        )
        if dist.is_main:
            self.logger.open(
                self.run_dir / "metrics.jsonl", self.state.step if self.resumed else None
            )
        self.validator = Validator(
            t.val_every,
            lambda: self._validate(dist),
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
        self.budget = self._build_budget()

    def _build_budget(self) -> BudgetFit:
        """train.budget_schedule's fit, timing the steps, a validation and a checkpoint."""
        val_episodes = sum(len(v) for v in self.val_sets.values())
        work = ProbeWork(self._evaluate_some, self.checkpoints.time_write)
        return BudgetFit(
            self.cfg.train,
            val_episodes,
            dict(self.chunk_shape(), at_once=self.plan.at_once),
            self.dist,
            self.run_dir,
            work,
            self.say,
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
            strategy(self.plan.at_once),
            dist,
        )["accuracy"]

    def _validate(self, dist) -> dict:
        """The val accuracy on the fixed val episodes (many sources: the mean of theirs, each one's
        as val_accuracy/<source> too)."""
        steps = self.cfg.eval.val_inner_steps
        accs = {name: self.evaluate(eps, steps, dist) for name, eps in self.val_sets.items()}
        out = {"val_accuracy": sum(accs.values()) / len(accs)}
        if self.names:
            out.update({f"val_accuracy/{name}": a for name, a in accs.items()})
        return out

    def _evaluate_some(self) -> int:
        """One validation on a few val episodes (the budget schedule times it)."""
        some = next(iter(self.val_sets.values())).first(2 * self.cfg.eval.tasks_per_batch)
        self.evaluate(some, self.cfg.eval.val_inner_steps)
        return len(some)

    def _save_best(self, step: int, accuracy: float) -> None:
        save_weights(self.model, self.run_dir / "best.safetensors", self.config, step, accuracy)

    # ---- the loop ----
    def fit(self) -> dict:
        t, state, device = self.cfg.train, self.state, self.device
        self.say(
            f"training {self.cfg.algo.name} ({self.plan.line(t.meta_batch_size)}) on "
            f"{self.dist.world} process(es), {device}, {self.dist.threads} thread(s) "
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
                self.logger.add(loss_sum, acc_sum, self.local_tasks, batch.get("source"))
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
        inner = self.algorithm.test_inner(
            cfg.eval.inner_steps, cfg.algo.inner_lr, self.model.head_names()
        )
        args = (inner, cfg.eval.tasks_per_batch, self.device)
        if self.names:  # Meta-Dataset's table: each source's test episodes
            tests = {
                n: EpisodeSource(r, "test", access=self.access).all(cfg.eval.episodes_per_source)
                for n, r in zip(self.names, self.roots)
            }
            r = source_table(
                self.model, tests, *args, strategy=strategy(self.plan.at_once), dist=dist
            )
        else:
            test = EpisodeSource(self.root, "test", access=self.access).all(cfg.eval.test_episodes)
            r = evaluate(self.model, test, *args, strategy(self.plan.at_once), dist)
        summary = self._summary(r)
        if dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            if self.names:
                self.say(format_table(r, "test source"))
            self.say(
                f"test accuracy {r['accuracy']:.4f} +- {r['ci95']:.4f} (95% CI, {r['episodes']} "
                f"episodes{', mean over sources' if self.names else ''}, "
                f"{inner.steps} inner steps); {state.step} steps in "
                f"{state.elapsed / 60:.1f} min"
            )
            self.tracker.summary(flat_summary(summary))
            if cfg.tracking.log_model:
                self.tracker.log_model(self.run_dir / "model.safetensors")
        self.tracker.finish()
        return summary

    def _summary(self, r: dict) -> dict:
        cfg, dist, s = self.cfg, self.dist, self.state
        per_source = {}
        if self.names:  # each source's row, with the id of its test episodes
            per_source = {
                "test_sources": {
                    n: dict(r["sources"][n], test_set=test_set_id(root))
                    for n, root in zip(self.names, self.roots)
                }
            }
        return {
            "test_accuracy": r["accuracy"],
            "test_ci95": r["ci95"],
            "test_episodes": r["episodes"],
            "test_set": test_set_id(*self.roots),
            **per_source,
            "test_inner_steps": cfg.eval.inner_steps,
            "best_val_accuracy": s.best_val,
            "best_step": s.best_step,
            "steps": s.step,
            "wall_time_s": s.elapsed,
            "tasks_per_s": s.tasks_seen / max(s.elapsed, 1e-9),
            "world_size": dist.world,
            "plan": s.plan,
            "tasks_at_once": self.plan.at_once,
            "reduce": self.plan.reduce,
            "threads": dist.threads,
            "algorithm": cfg.algo.name,
            "seed": cfg.seed,
            "data_seed": cfg.data.seed,
            "allreduce_ms_per_step": 1000 * dist.reduce_seconds / max(1, s.step - self.start_step),
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
