"""The plan's measurement of the tasks computed at once (metadist/step/plan.py) and its
per-machine cache (metadist/machine.py), with a measured chunk that is a fake with a known speed;
the machine key names every setting that changes the kernels."""

import dataclasses
from pathlib import Path

import pytest
import torch

from metadist import log, machine
from metadist.step import Ask, decide, plan


class Chunks:
    """run_chunk(size) -> size, taking size * costs[size] seconds of a fake clock."""

    def __init__(self, monkeypatch, costs: dict[int, float]):
        self.costs, self.now, self.calls = costs, 0.0, []
        monkeypatch.setattr(plan.time, "perf_counter", lambda: self.now)

    def __call__(self, size: int) -> int:
        self.calls.append(size)
        self.now += size * self.costs[size]
        return size


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METADIST_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def auto(b=32, reduce="fast", device="cpu", **kw):
    return Ask("auto", 0, reduce, "auto", b, 1, 4, device, **kw)


COSTS = {1: 0.05, 2: 0.04, 4: 0.03, 8: 0.02, 16: 0.03}


def test_measure_interleaves_and_keeps_the_best_round(monkeypatch):
    run = Chunks(monkeypatch, {1: 0.25, 4: 0.5 / 4})
    speed = plan.measure(run, [1, 4], rounds=2)
    # a warm-up round, then two measured ones, the sizes taking turns
    assert run.calls == [1, 4] * 3
    assert speed == {"1": 1 / 0.25, "4": 4 / 0.5}


def test_auto_measures_the_candidates_and_takes_the_fastest(monkeypatch, cache):
    """Fast mode: 1, 2, 4, 8 and 16 at once (up to the meta-batch); exact mode: only the groups
    that leave enough for train.exact_processes; the record names every speed."""
    run = Chunks(monkeypatch, COSTS)
    got = decide(auto(), run, {"ways": 5})
    assert got.at_once == 8 and set(got.tasks_per_s) == {"1", "2", "4", "8", "16"}
    assert "8 at once" in got.why and "measured now" in got.why
    run = Chunks(monkeypatch, COSTS)
    got = decide(auto(8, "exact"), run, {"ways": 6})
    assert got.at_once == 2 and set(got.tasks_per_s) == {"1", "2"} and got.worlds == (1, 2, 4)
    assert set(run.calls) == {1, 2}


def test_sizes_whose_measurement_costs_too_much_are_left_out():
    # 0.1 s a task, 3 rounds: 16 tasks cost 4.8 s, within MEASURE_SECONDS; at 1 s a task only 1, 2
    assert plan.MEASURE_SECONDS >= 4.8
    assert plan.sizes_within([1, 2, 4, 8, 16], 0.1, 3) == [1, 2, 4, 8, 16]
    assert plan.sizes_within([1, 2, 4, 8, 16], 1.0, 3) == [1, 2]
    assert plan.sizes_within([2, 4], 60.0, 3) == [2]  # always the smallest


def test_an_explicit_choice_and_a_gpu_measure_nothing(monkeypatch, cache):
    run = Chunks(monkeypatch, COSTS)
    assert decide(dataclasses.replace(auto(), strategy="batched"), run, {}).at_once == 0
    assert decide(dataclasses.replace(auto(), tasks_per_chunk=4), run, {}).why == (
        "algo.tasks_per_chunk=4"
    )
    got = decide(auto(device="cuda"), run, {})
    assert got.at_once == 0 and got.compute == "graph"
    assert run.calls == [] and not cache.exists()  # nothing was measured


def test_auto_on_a_cpu_measures_once_per_machine_and_shape(monkeypatch, cache):
    run = Chunks(monkeypatch, COSTS)
    first = decide(auto(), run, {"ways": 5})
    n = len(run.calls)
    # the same machine and shape: read, not measured, even if the speeds have changed since
    run.costs = {1: 0.01, 2: 0.04, 4: 0.04, 8: 0.04, 16: 0.04}
    again = decide(auto(), run, {"ways": 5})
    assert again.at_once == first.at_once == 8 and "cached in" in again.why
    assert len(run.calls) == n
    # another shape is measured anew
    assert decide(auto(), run, {"ways": 20}).at_once == 1 and len(run.calls) > n
    # and so is another machine: the key names the CPU beyond its model name (two generations
    # of "AMD EPYC" differ in family/model/stepping and flags), torch's build, the threads, ATen's
    # dispatch level and oneDNN's ISA cap
    rec = plan.cached_choice({"ways": 5}, run, [1, 2, 4, 8, 16])
    key = rec["key"]
    want = {"cpu", "cpu_id", "vector_flags", "kernels", "onednn_isa", "torch", "torch_build"}
    assert key["shape"] == {"ways": 5, "sizes": [1, 2, 4, 8, 16]} and want | {"threads"} <= set(key)
    assert "family" in key["cpu_id"] and "stepping" in key["cpu_id"]
    for other_machine in (
        dict(key, threads=key["threads"] + 7),
        dict(key, cpu_id=key["cpu_id"] + "0"),  # same model name, another stepping
        dict(key, vector_flags=key["vector_flags"] + " avx512_fp16x"),
        dict(key, torch_build=key["torch_build"] + "x"),
        # another oneDNN cap than this run's own (which is SSE41 itself under those caps)
        dict(key, onednn_isa="SSE41" if key["onednn_isa"] != "SSE41" else "AVX2"),
    ):
        monkeypatch.setattr(machine, "machine", lambda m=other_machine: m)
        n = len(run.calls)
        got = decide(auto(), run, {"ways": 5})
        assert len(run.calls) > n and "measured now" in got.why


def test_the_onednn_cap_is_part_of_the_kernels(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    native = machine.kernels()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    capped = machine.kernels()
    assert native["onednn_isa"] == "NATIVE" and capped["onednn_isa"] == "AVX2"
    assert native != capped


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
    run = Chunks(monkeypatch, COSTS)
    said = []
    with log.to(said.append):
        got = decide(auto(), run, {})
    assert got.at_once == 8 and "measured now" in got.why
    assert len(said) == 1 and "cannot use the cache" in said[0] and "METADIST_CACHE_DIR" in said[0]
