"""Which strategy runs a rank's tasks (metadist/strategy.py): the rule, the measurement and its
per-machine cache (metadist/machine.py), with a measured chunk that is a fake with a known speed."""

from pathlib import Path

import pytest
import torch

from metadist import machine, strategy


class Chunks:
    """run_chunk(strategy, size) -> size, taking size * costs[...] seconds of a fake clock: the
    cost a task of "batched/<size>" if given, else of the strategy."""

    def __init__(self, monkeypatch, costs: dict[str, float]):
        self.costs, self.now, self.calls = costs, 0.0, []
        monkeypatch.setattr(strategy.time, "perf_counter", lambda: self.now)

    def __call__(self, name: str, size: int) -> int:
        self.calls.append((name, size))
        self.now += size * self.costs.get(f"{name}/{size}", self.costs[name])
        return size


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METADIST_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def choose(requested, device, shape, run, most=4, free=False, say=print):
    return strategy.choose(requested, torch.device(device), shape, run, most, free, say)


def test_measure_interleaves_and_keeps_the_best_round(monkeypatch):
    costs = {"batched": 0.5 / 4, "loop": 0.25 / 4}
    run = Chunks(monkeypatch, costs)
    speed = strategy.measure(run, [4], rounds=2)
    # a warm-up round, then two measured ones, the strategies taking turns
    assert run.calls == [("loop", 4), ("batched", 4)] * 3
    assert speed == {"batched": 4 / 0.5, "loop": 4 / 0.25}


def test_auto_measures_the_tasks_computed_at_once_and_records_the_fastest(monkeypatch, cache):
    """free: the batched strategy at 2, 4, 8 and 16 tasks at once (up to the rank's tasks); the
    fastest size is the record's tasks_at_once, and the log line says it."""
    costs = {"loop": 0.05, "batched": 0.04, "batched/8": 0.02, "batched/16": 0.03}
    run = Chunks(monkeypatch, costs)
    got = choose("auto", "cpu", {"ways": 5}, run, most=16, free=True, say=lambda *a: None)
    assert got["strategy"] == "batched" and got["tasks_at_once"] == 8
    assert set(got["tasks_per_s"]) == {"loop", "batched/2", "batched/4", "batched/8", "batched/16"}
    assert "8 tasks at once" in got["why"]
    assert {size for name, size in run.calls if name == "batched"} == {2, 4, 8, 16}
    # a rank of 6 tasks: 2, 4 and 6; the loop winning records no size
    run = Chunks(monkeypatch, {"loop": 0.01, "batched": 0.04})
    got = choose("auto", "cpu", {"ways": 6}, run, most=6, free=True, say=lambda *a: None)
    assert got["strategy"] == "loop" and got["tasks_at_once"] == 0
    assert set(got["tasks_per_s"]) == {"loop", "batched/2", "batched/4", "batched/6"}
    # not free (algo.tasks_per_chunk set, or variable episodes): one size, the settings' own
    run = Chunks(monkeypatch, {"loop": 0.05, "batched": 0.04})
    got = choose("auto", "cpu", {"ways": 7}, run, most=4, free=False, say=print)
    assert got["tasks_at_once"] == 0 and set(got["tasks_per_s"]) == {"loop", "batched"}


def test_sizes_whose_measurement_costs_too_much_are_left_out():
    # 0.1 s a task, 3 rounds: 16 tasks cost 4.8 s, within MEASURE_SECONDS; at 1 s a task only 2
    assert strategy.MEASURE_SECONDS >= 4.8
    assert strategy.sizes(32, 0.1, 3) == [2, 4, 8, 16]
    assert strategy.sizes(32, 1.0, 3) == [2]
    assert strategy.sizes(32, 60.0, 3) == [2]  # always the smallest
    assert strategy.sizes(3, 0.01, 3) == [2, 3] and strategy.sizes(1, 0.01, 3) == [1]


def test_an_explicit_strategy_is_used_as_asked_and_a_gpu_takes_batched(monkeypatch, cache):
    run = Chunks(monkeypatch, {"batched": 1.0, "loop": 0.1})
    assert choose("batched", "cpu", {}, run)["strategy"] == "batched"
    assert choose("loop", "cpu", {}, run)["why"] == "algo.strategy=loop"
    got = choose("auto", "cuda", {}, run)
    assert got["strategy"] == "batched" and "cuda" in got["why"]
    assert run.calls == [] and not cache.exists()  # nothing was measured


def test_auto_on_a_cpu_measures_once_per_machine_and_shape(monkeypatch, cache):
    run = Chunks(monkeypatch, {"batched": 0.4, "loop": 0.2})
    first = choose("auto", "cpu", {"ways": 5}, run, say=lambda *a: None)
    assert first["strategy"] == "loop" and "measured now" in first["why"]
    n = len(run.calls)
    # the same machine and shape: read, not measured, even if the speeds have changed since
    run.costs = {"batched": 0.1, "loop": 0.4}
    again = choose("auto", "cpu", {"ways": 5}, run)
    assert again["strategy"] == "loop" and "cached in" in again["why"] and len(run.calls) == n
    # another shape is measured anew
    other = choose("auto", "cpu", {"ways": 20}, run)
    assert other["strategy"] == "batched" and len(run.calls) > n
    # and so is another machine: the key names the CPU beyond its model name (two generations
    # of "AMD EPYC" differ in family/model/stepping and flags), torch's build, the threads
    key = first["key"]
    want = {"cpu", "cpu_id", "vector_flags", "kernels", "torch", "torch_build", "threads"}
    assert key["shape"] == {"ways": 5, "at_once": [4, False]} and want <= set(key)
    assert "family" in key["cpu_id"] and "stepping" in key["cpu_id"]
    for other_machine in (
        dict(key, threads=key["threads"] + 7),
        dict(key, cpu_id=key["cpu_id"] + "0"),  # same model name, another stepping
        dict(key, vector_flags=key["vector_flags"] + " avx512_fp16x"),
        dict(key, torch_build=key["torch_build"] + "x"),
    ):
        monkeypatch.setattr(machine, "machine", lambda m=other_machine: m)
        n = len(run.calls)
        got = choose("auto", "cpu", {"ways": 5}, run, say=lambda *a: None)
        assert len(run.calls) > n and "measured now" in got["why"]


def test_the_machine_key_reads_the_cpu_identity_of_proc_cpuinfo():
    """On Linux the key's CPU fields come from /proc/cpuinfo's first processor (x86 or Arm)."""
    facts = machine.cpu_facts()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "vendor_id" in text:
        first = text.split("\n\n")[0]
        fields = {
            k.strip(): v.strip() for k, _, v in (x.partition(":") for x in first.splitlines())
        }
        assert facts["vendor"] == fields["vendor_id"] and facts["model"] == fields["model"]
        assert facts["stepping"] == fields["stepping"]
        assert set(facts["vector_flags"]) == set(machine.VECTOR_FLAGS) & set(
            fields["flags"].split()
        )
    key = machine.machine()
    assert key["kernels"] == torch.backends.cpu.get_cpu_capability()
    assert key["torch_build"].startswith(torch.__version__)


def test_an_unwritable_cache_measures_for_this_run_and_says_so(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("METADIST_CACHE_DIR", str(blocker / "cache"))
    run = Chunks(monkeypatch, {"batched": 0.2, "loop": 0.4})
    said = []
    got = choose("auto", "cpu", {}, run, say=said.append)
    assert got["strategy"] == "batched" and "measured now" in got["why"]
    assert len(said) == 1 and "cannot use the cache" in said[0] and "METADIST_CACHE_DIR" in said[0]
