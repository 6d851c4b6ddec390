"""The plan of a run's meta-step, decided once before the step exists: how many tasks a rank
computes at once, how the ranks sum (exact or fast), how it computes (eager, compiled by inductor,
a CUDA graph), and, in exact mode, the world sizes that give the same weights. `decide` returns a
frozen `Plan` with its reasons; the step is built from it; the run records it (strategy.json,
every checkpoint, summary.json) and a resumed run reads it back.

- Tasks at once (`at_once`, g): `algo.tasks_per_chunk` when set (1: one task at a time, the
  per-task loop). Else `algo.strategy=batched`, or `auto` on a GPU: a rank's tasks at once in
  fast mode; in exact mode the largest group that leaves at least `train.exact_processes` groups.
  `auto` on a CPU measures the candidates (1, 2, 4, 8, 16 tasks at once) on the run's own shape and
  takes the fastest: folded tasks make activations that many times larger, and once they leave
  the caches the memory-bound BatchNorm, ReLU and pooling slow down more than folding gains, at a
  size that depends on the CPU. The measurement is a property of the machine and the shape: kept
  in the per-machine cache (metadist/machine.py, keyed by every setting that changes the kernels),
  so every later run with that shape on that machine reads the same answer.
- Exact mode's groups are fixed over the global meta-batch, the same at every world size
  (metadist/step/reduce.py): the candidates are the divisors g of B that leave at least
  max(train.exact_processes, the launch's processes) groups, so the measured choice never depends
  on the world size, and the run states the world sizes it supports.
- Compute: `algo.compile=on` compiles the chunk with inductor on a CPU and captures the step as a
  CUDA graph on a GPU; `auto` captures on a GPU where the step's shapes are fixed; refusals are
  one line here. `auto` on a CPU compiles where it pays: once eager's tasks at once are chosen
  by measurement, a run long enough to repay a compile (COMPILE_MIN_SECONDS at eager's speed)
  compiles that chunk and measures it; the compiled step is kept when it is COMPILE_PAYS times
  eager's speed. That answer is cached per machine and shape like the tasks at once (so the same
  command gives the same weights), and inductor's artefacts go to the per-machine cache
  (metadist/step/compute.py), so a later run of the shape starts without compiling anew. A
  compile that fails, or does not pay, leaves the run eager, said in one line.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

from metadist import log
from metadist.config import ConfigError
from metadist.machine import cached, kernels, provenance
from metadist.models.library import parse as parse_library

SIZES = (1, 2, 4, 8, 16)  # tasks at once measured on a CPU
MEASURE_SECONDS = 6.0  # the most one size's measurement (every round) may take
# algo.compile=auto on a CPU: a run planned at least this long at eager's measured speed tries the
# compiled chunk (compiling costs about a minute per shape the first time, seconds later), and
# keeps it at this many times eager's speed
COMPILE_MIN_SECONDS = 300.0
COMPILE_PAYS = 1.1


@dataclass(frozen=True)
class Plan:
    at_once: int  # tasks computed at once (0: a rank's tasks in one graph)
    reduce: str = "fast"  # exact | fast
    compute: str = "eager"  # eager | compiled | graph
    worlds: tuple[int, ...] = ()  # exact: the world sizes that give the same weights
    why: str = ""
    tasks_per_s: dict = field(default_factory=dict)  # the measurement, when there was one

    def record(self) -> dict:
        return dict(dataclasses.asdict(self), worlds=list(self.worlds))

    @classmethod
    def of_record(cls, rec: dict) -> Plan:
        names = {f.name for f in dataclasses.fields(cls)}
        rec = {k: v for k, v in rec.items() if k in names}
        return cls(**dict(rec, worlds=tuple(rec.get("worlds", ()))))

    @classmethod
    def fixed(cls, at_once: int, reduce: str, meta_batch_size: int, compute: str = "eager") -> Plan:
        """A plan chosen by hand (benchmarks and tests): `at_once` tasks at once, the `reduce`
        mode's world sizes for `meta_batch_size`."""
        worlds = exact_worlds(meta_batch_size, at_once) if reduce == "exact" else ()
        return cls(at_once, reduce, compute, tuple(worlds))

    def local(self, local_tasks: int) -> int:
        """Tasks a rank computes at once."""
        return min(self.at_once or local_tasks, local_tasks)

    def line(self, meta_batch_size: int) -> str:
        """What the step computes, in one line."""
        at = f"{self.at_once} task(s) at once" if self.at_once else "a rank's tasks at once"
        if self.reduce == "exact":
            groups = meta_batch_size // self.at_once
            sizes = ", ".join(map(str, self.worlds))
            sums = f"exact: {groups} fixed groups of {self.at_once} task(s), the same weights at "
            return f"{sums}{sizes} process(es); {self.compute}"
        return f"fast: {at}, one all-reduce; {self.compute}"

    def check_world(self, world: int, meta_batch_size: int) -> None:
        if self.reduce == "exact" and world not in self.worlds:
            raise ConfigError(
                f"train.reduce=exact: this run sums {meta_batch_size // self.at_once} groups of "
                f"{self.at_once} tasks, which {world} processes cannot split evenly; launch "
                f"{', '.join(map(str, self.worlds))} processes, or start a new run with "
                "train.exact_processes (or algo.tasks_per_chunk) for this many"
            )


@dataclass(frozen=True)
class Ask:
    """What the config and the world ask of the plan."""

    strategy: str  # auto | batched
    tasks_per_chunk: int
    reduce: str
    compile: str  # auto | on | off
    meta_batch_size: int
    world: int
    exact_processes: int
    device: str  # cpu | cuda
    cannot_compile: str = ""  # why this step cannot be compiled or captured ("" where it can)
    debug: bool = False
    variable: bool = False  # variable episodes (the measurement stays at 4 tasks and under)
    # the backbone computes its tasks one at a time (a torchvision or timm network): no sizes to
    # measure, one task at once in fast mode
    one_at_a_time: str = ""  # its model.backbone
    steps: int = 0  # train.steps (with a time budget, an upper bound)
    max_minutes: float = 0.0  # train.max_minutes (0: none)

    def planned_seconds(self, tasks_per_s: float) -> float:
        """How long the run trains at a rank's `tasks_per_s`: its steps, or its time budget."""
        local = -(-self.meta_batch_size // self.world)
        s = self.steps * local / max(tasks_per_s, 1e-9)
        return min(s, self.max_minutes * 60) if self.max_minutes else s


def _groups(ask: Ask, top: int) -> list[int]:
    """Exact mode's group sizes up to `top`: divisors g of B that leave at least
    max(train.exact_processes, the launch's processes) groups (every B has 1)."""
    b = ask.meta_batch_size
    least = min(b, max(ask.exact_processes, ask.world))
    return [g for g in range(1, min(b, top) + 1) if b % g == 0 and b // g >= least] or [1]


def candidates(ask: Ask) -> list[int]:
    """The tasks-at-once sizes `auto` measures: exact mode's groups, fast mode's SIZES, up to B
    (and 4 for variable episodes, whose largest can take gigabytes a task)."""
    top = 4 if ask.variable else SIZES[-1]
    if ask.reduce == "exact":
        return _groups(ask, top)
    return [g for g in SIZES if g <= min(ask.meta_batch_size, top)]


def _compute(ask: Ask) -> str:
    """eager | compiled (inductor, a CPU) | graph (a CUDA graph); algo.compile=on where the step
    cannot be compiled is refused here, in one line, on either device."""
    if ask.compile == "on" and (ask.cannot_compile or ask.debug):
        why = ask.cannot_compile or "debug mode cross-checks the eager step"
        raise ConfigError(
            f"algo.compile=on: {why}, so the step cannot be compiled; use algo.compile=off"
        )
    if ask.device == "cuda":
        return (
            "graph"
            if ask.compile != "off" and not ask.cannot_compile and not ask.debug
            else "eager"
        )
    return "compiled" if ask.compile == "on" else "eager"


def _rule(ask: Ask) -> tuple[int, str]:
    """Tasks at once without a measurement, and why."""
    if ask.tasks_per_chunk:
        return ask.tasks_per_chunk, f"algo.tasks_per_chunk={ask.tasks_per_chunk}"
    if ask.reduce == "exact":
        g = max(_groups(ask, ask.meta_batch_size))
        return g, f"the largest group that leaves {ask.meta_batch_size // g} groups"
    if ask.one_at_a_time:
        return 1, f"{ask.one_at_a_time} runs its tasks one at a time"
    return 0, "a rank's tasks at once"


def decide(ask: Ask, run_chunk, shape: dict) -> Plan:
    """The plan for `ask`; `run_chunk(size) -> tasks` times one meta-backward of `size` tasks of
    the run's shape (auto on a CPU measures with it); `shape` keys the cache."""
    compute = _compute(ask)
    measured = (
        ask.strategy == "auto"
        and ask.device == "cpu"
        and not ask.tasks_per_chunk
        and compute == "eager"
        and not ask.debug
        and not ask.one_at_a_time
    )
    if measured:
        rec = cached_choice(shape, run_chunk, candidates(ask))
        at_once, speeds = rec["at_once"], rec["tasks_per_s"]
        where = provenance(rec)
        listed = ", ".join(f"{k} at once {v:.1f}" for k, v in speeds.items())
        why = f"algo.strategy=auto on this CPU: {listed} tasks/s ({where})"
        if ask.compile == "auto" and not ask.cannot_compile:
            compute, said = compile_if_it_pays(ask, shape, run_chunk, at_once, speeds)
            why = f"{why}; {said}" if said else why
    else:
        (at_once, why), speeds = _rule(ask), {}
        why = "debug mode: " + why if ask.debug else why
    plan = Plan.fixed(at_once, ask.reduce, ask.meta_batch_size, compute)
    return dataclasses.replace(plan, why=why, tasks_per_s=speeds)


def compile_if_it_pays(ask: Ask, shape: dict, run_chunk, at_once: int, speeds: dict):
    """(compute, what was decided: "" for a run too short to try) for algo.compile=auto on a CPU,
    eager's `at_once` chosen at `speeds`: the compiled chunk measured once per machine and shape
    (`run_chunk(size, compiled=True)`), kept at COMPILE_PAYS times eager's tasks/s."""
    eager = speeds[str(at_once)]
    if ask.planned_seconds(eager) < COMPILE_MIN_SECONDS:
        return "eager", ""
    rec = cached(
        "compile", dict(shape, at_once=at_once), lambda: measure_compiled(run_chunk, at_once)
    )
    where = provenance(rec)
    if rec.get("failed"):
        return (
            "eager",
            f"algo.compile=auto: compiling failed here ({rec['failed']}), so eager ({where})",
        )
    fast, ratio = rec["tasks_per_s"], rec["tasks_per_s"] / eager
    compute = "compiled" if ratio >= COMPILE_PAYS else "eager"
    verdict = "compiled" if compute == "compiled" else f"eager (under {COMPILE_PAYS}x: no gain)"
    return compute, (
        f"algo.compile=auto: compiled {fast:.1f} tasks/s against eager's {eager:.1f} "
        f"({ratio:.2f}x; its compile took {rec['compile_s']:.0f} s), so {verdict} ({where})"
    )


def measure_compiled(run_chunk, size: int) -> dict:
    """{tasks_per_s, compile_s} of the compiled chunk of `size` tasks (its first call compiles), or
    {failed: why} where inductor cannot compile it here (no C++ compiler, an unsupported op)."""
    t = time.perf_counter()
    try:
        run_chunk(size, compiled=True)
    except Exception as e:  # inductor's failures have no one type; the run goes on eager
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return {"failed": f"{type(e).__name__}: {first}"}
    compile_s = time.perf_counter() - t
    speed = measure(lambda c: run_chunk(c, compiled=True), [size])[str(size)]
    return {"tasks_per_s": speed, "compile_s": compile_s}


def exact_worlds(meta_batch_size: int, at_once: int) -> list[int]:
    """The world sizes at which exact mode gives the same weights: those dividing the
    meta-batch's B / at_once fixed groups."""
    groups = meta_batch_size // at_once
    return [w for w in range(1, groups + 1) if groups % w == 0]


def sizes_within(sizes: list[int], task_seconds: float, rounds: int) -> list[int]:
    """The sizes whose `rounds` cost at most MEASURE_SECONDS at `task_seconds` a task; at least
    the smallest."""
    return [c for c in sizes if c * task_seconds * rounds <= MEASURE_SECONDS] or sizes[:1]


def measure(run_chunk, sizes: list[int], rounds: int = 2) -> dict[str, float]:
    """Tasks/s of each size ("8": 8 tasks at once): `run_chunk(size) -> tasks` runs that many
    tasks' meta-backward; interleaved, best of `rounds` after a warm-up round."""
    best = dict.fromkeys(map(str, sizes), 0.0)
    for r in range(rounds + 1):
        for c in sizes:
            t = time.perf_counter()
            tasks = run_chunk(c)
            if r:
                best[str(c)] = max(best[str(c)], tasks / (time.perf_counter() - t))
    return best


def pick(run_chunk, sizes: list[int]) -> dict:
    """{at_once, tasks_per_s}, measured now."""
    run_chunk(1)
    t = time.perf_counter()
    run_chunk(1)
    speed = measure(run_chunk, sizes_within(sizes, time.perf_counter() - t, 3))
    return {"at_once": int(max(speed, key=speed.get)), "tasks_per_s": speed}


def cached_choice(shape: dict, run_chunk, sizes: list[int]) -> dict:
    """`pick`, once per machine and shape (see metadist.machine.cached)."""
    return cached("plan", dict(shape, sizes=sizes), lambda: pick(run_chunk, sizes))


def ask_of(sections, world: int, device: str, variable: bool, sources: bool) -> Ask:
    """What a run's (model, algo, train) sections and world ask of the plan; what a compiled step
    cannot do is named here."""
    m, a, t = sections
    library = parse_library(m.backbone) is not None  # a torchvision or timm network
    cannot = (
        f"{m.backbone} runs one task at a time through torch.func.functional_call"
        if library
        else "DropBlock draws its masks on the host each step"
        if m.dropblock
        else "variable episodes change shape every step"
        if variable
        else "many sources change the episode shape every step"
        if sources
        else ""
    )
    return Ask(
        strategy=a.strategy,
        tasks_per_chunk=a.tasks_per_chunk,
        reduce=t.reduce,
        compile=a.compile,
        meta_batch_size=t.meta_batch_size,
        world=world,
        exact_processes=t.exact_processes,
        device=device,
        cannot_compile=cannot,
        debug=t.debug,
        variable=variable,
        one_at_a_time=m.backbone if library else "",
        steps=t.steps,
        max_minutes=t.max_minutes,
    )


def shape_of(sections, image_shape, variable: bool, head_init: str, second_order: bool, device):
    """What decides a chunk's speed: the plan's and the budget's cache key, with the machine.
    `sections`: the run's (model, algo, data, train) sections."""
    m, a, d, t = sections
    episode = dict(zip(("ways", "shots", "queries"), d.episode_shape("train")))
    if variable:
        episode = {"episode": "variable", **dataclasses.asdict(d.variable)}
    return {
        "model": dataclasses.asdict(m),
        "image": list(image_shape),
        **episode,
        "algo": a.name,
        "second_order": second_order,
        "inner_steps": a.inner_steps,
        "learn_inner_lr": a.learn_inner_lr,
        "per_step_bn": a.per_step_bn,
        "tasks_per_chunk": a.tasks_per_chunk,
        "compile": a.compile,
        "reduce": t.reduce,
        "head_init": head_init,
        "device": device,
    }


def for_run(ask: Ask, kept: dict, record, dist, run_chunk, shape: dict) -> Plan:
    """A run's plan: `kept` (its checkpoint's plan record) on resume, else decided by rank 0 for
    every rank and written to `record` (strategy.json). Exact mode then checks that every rank
    runs the same kernels (`dist.gather_objects`)."""
    plan = failed = None
    if dist.is_main:
        try:
            plan = Plan.of_record(kept) if kept else decide(ask, run_chunk, shape)
            if not kept:
                record.write_text(json.dumps(plan.record(), indent=1) + "\n")
                log.say(plan.why)
        except ConfigError as e:
            failed = str(e)
    plan, failed = dist.broadcast_object((plan, failed))
    if failed:
        raise ConfigError(failed)
    if plan.reduce == "exact":
        same_kernels(dist.gather_objects(kernels()))
    return plan


def same_kernels(every: list[dict]) -> None:
    """Exact mode: a group's gradient has the same bits on every rank only where the ranks run
    the same kernels; ranks that do not (`every`: each rank's machine.kernels()) are refused in
    one line naming what differs."""
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
