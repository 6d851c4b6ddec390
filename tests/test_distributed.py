"""Distributed meta-training on CPU (gloo), through the real `accelerate launch`: world-size
invariance (1/2/4 processes, bit for bit in the exact mode, also across a 2 -> 1 -> 4 resume),
SIGKILL + resume, two-node loopback, start-up errors, clean exits, seeds sharing one shard set.

Exact mode (train.reduce=exact, the default) promises bit-identical weights for every world size
when every process runs the same number of intra-op threads: these runs pin train.threads=1.
Tests that compare runs with different thread counts (or the fast mode, whose float32 all-reduce
sums in another order than one process does) allow WEIGHT_TOL (max absolute difference after 3
Adam steps at lr 1e-3, i.e. under 1% of one step), or, on a CPU whose kernels round more, 10x what
reordering the same sum inside one process does there; losses to 1e-5 relative.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from metadist.checkpoint import load_weights
from tests.conftest import (
    ROOT,
    free_port,
    launch,
    launch_cmd,
    max_diff,
    run_cli,
    small_overrides,
    weights,
)

pytestmark = pytest.mark.slow
WEIGHT_TOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory, omniglot_dir):
    tmp = tmp_path_factory.mktemp("dist")
    args = small_overrides(
        omniglot_dir,
        tmp,
        **{
            "train.steps": 3,
            "train.val_every": 3,
            "train.checkpoint_every": 3,
            "algo.inner_steps": 2,
            "model.hidden": 16,
        },
    )
    r = run_cli("prepare", *args)  # shards once, before the ranks start
    assert r.returncode == 0, r.stderr
    return tmp, args


def exact_args(base, steps):
    tmp, args = base
    return tmp, args + [
        "train.threads=1",
        "model.hidden=8",
        "algo.inner_steps=1",
        # batched: the meta-batch of 8 in 4 fixed groups of 2 tasks at every world size
        "algo.strategy=batched",
        f"train.steps={steps}",
        "train.val_every=50",
        "train.checkpoint_every=1000",
        "train.log_every=10",
    ]


@pytest.fixture(scope="module")
def exact30(base):
    """The exact mode's reference, one process and 30 steps (for the 1-2-4 and resume tests)."""
    tmp, args = exact_args(base, 30)
    r = launch(1, args + ["run.name=x1"])
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "runs" / "x1", r.stdout


def test_1_2_4_processes_are_bit_identical_after_30_steps(base, exact30):
    """Exact mode: the same weights to the last bit, the same losses and validation accuracies
    (any difference in one step's reduction would show in the bits of the next; 30 steps carry it
    through Adam's moments and two epochs of the 96 train episodes)."""
    tmp, args = exact_args(base, 30)
    runs = {1: exact30[0]}
    for n in (1, 2, 4):
        if n > 1:
            r = launch(n, args + [f"run.name=x{n}"])
            assert r.returncode == 0, r.stderr[-3000:]
            runs[n] = tmp / "runs" / f"x{n}"
        said = r.stdout if n > 1 else exact30[1]
        assert f"on {n} process(es)" in said
        assert "exact: 4 fixed groups of 2 task(s), the same weights at 1, 2, 4" in said
    ref = weights(runs[1])
    ref_val = [
        m.get("val_accuracy")
        for m in map(json.loads, (runs[1] / "metrics.jsonl").read_text().splitlines())
    ]
    for n in (2, 4):
        assert max_diff(ref, weights(runs[n])) == 0.0, n
        val = [
            m.get("val_accuracy")
            for m in map(json.loads, (runs[n] / "metrics.jsonl").read_text().splitlines())
        ]
        assert val == ref_val
        s1, sn = (json.loads((runs[k] / "summary.json").read_text()) for k in (1, n))
        assert sn["world_size"] == n and sn["test_accuracy"] == s1["test_accuracy"]


def test_a_run_resumed_2_then_1_then_4_processes_equals_the_uninterrupted_one(base, exact30):
    tmp, args = exact_args(base, 30)
    for n, upto in ((2, 10), (1, 20), (4, 30)):
        r = launch(
            n, args + ["run.name=hopped", f"train.steps={upto}", "train.checkpoint_every=10"]
        )
        assert r.returncode == 0, r.stderr[-3000:]
        if upto > 10:
            assert f"from step_{upto - 10:06d}" in r.stdout and f", now {n})" in r.stdout
    meta = json.loads(
        (tmp / "runs" / "hopped" / "checkpoints" / "step_000030" / "meta.json").read_text()
    )
    assert meta["world_size"] == 4 and meta["plan"]["reduce"] == "exact"
    assert meta["data_position"] == 30 * 8
    # constant learning rate: the legs stopped at 10 and 20 take the same steps as the run of 30
    assert max_diff(weights(exact30[0]), weights(tmp / "runs" / "hopped")) == 0.0


@pytest.mark.long
def test_the_same_command_twice_gives_the_same_weights_with_auto_strategy(base, tmp_path):
    """algo.strategy=auto, 2 processes, twice, with a cache of its own: the first run measures, the
    second reads the cache; the weights are equal to the last bit."""
    tmp, args = exact_args(base, 20)
    env = {"METADIST_CACHE_DIR": str(tmp_path / "cache")}
    outs = []
    for name in ("auto-a", "auto-b"):
        r = launch(2, args + [f"run.name={name}", "algo.strategy=auto"], env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(r.stdout)
    assert "measured now" in outs[0] and "measured now" not in outs[1] and "cached in" in outs[1]
    assert max_diff(weights(tmp / "runs" / "auto-a"), weights(tmp / "runs" / "auto-b")) == 0.0


def test_fast_mode_agrees_within_float32_reordering(base):
    tmp, args = base
    args = args + ["train.reduce=fast"]
    runs = {}
    for n in (1, 2):
        r = launch(n, args + [f"run.name=f{n}"])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[n] = tmp / "runs" / f"f{n}"
    ref = weights(runs[1])
    # the same sum, reordered
    r = launch(1, args + ["run.name=f1-chunked", "algo.tasks_per_chunk=4"])
    assert r.returncode == 0, r.stderr[-3000:]
    tol = max(WEIGHT_TOL, 10 * max_diff(ref, weights(tmp / "runs" / "f1-chunked")))
    assert max_diff(ref, weights(runs[2])) <= tol
    a, b = (
        [json.loads(x) for x in (runs[k] / "metrics.jsonl").read_text().splitlines()]
        for k in (1, 2)
    )
    for x, y in zip(a, b):
        assert x["step"] == y["step"] and abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"])


def test_three_seeds_train_from_one_shard_set_without_raw_data(base, tmp_path):
    """Seeds 0..2 on the shards prepared once, from another folder with no raw data anywhere:
    the shard folder's bytes are unchanged, every run is tested on the same test episodes, and
    the seeds really give different runs."""
    import hashlib

    tmp, args = base
    shards = tmp / "shards"
    before = {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards.rglob("*") if p.is_file()
    }
    env = {k: v for k, v in os.environ.items() if k != "OMNIGLOT_DIR"}
    a = [x for x in args if not x.startswith("data.raw=")] + [
        "data.raw=/nonexistent",
        "train.steps=2",
    ]
    summaries = []
    for seed in range(3):
        r = subprocess.run(
            [sys.executable, "-m", "metadist", "train", *a, f"seed={seed}", f"run.name=seed{seed}"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert "preparing" not in r.stdout
        summaries.append(json.loads((tmp / "runs" / f"seed{seed}" / "summary.json").read_text()))
    assert {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards.rglob("*") if p.is_file()
    } == before
    assert len({s["test_set"] for s in summaries}) == 1 and all(
        s["test_episodes"] == 24 for s in summaries
    )
    assert [s["seed"] for s in summaries] == [0, 1, 2]
    assert {s["data_seed"] for s in summaries} == {0}
    w = [weights(tmp / "runs" / f"seed{k}") for k in range(3)]
    assert all(max_diff(w[0], w[k]) > 0 for k in range(1, 3))


# the runs that are stopped, killed or preempted, and resumed: 2 processes, 30 steps, steps slow
# enough (hidden 32) to stop one midway; how often a run checkpoints and how long a collective may
# wait do not change its weights (the resumed exact run above checkpoints every 10 steps, its
# reference never)
KILLED = ["train.steps=30", "train.checkpoint_every=5", "train.val_every=1000", "model.hidden=32"]


@pytest.fixture(scope="module")
def straight(base):
    """The uninterrupted run every stopped one must end equal to."""
    tmp, args = base
    r = launch(2, args + KILLED + ["run.name=straight"])
    assert r.returncode == 0, r.stderr[-3000:]
    return weights(tmp / "runs" / "straight")


def test_sigkill_and_resume_equals_uninterrupted(base, straight):
    tmp, args = base
    args = args + KILLED
    cmd = launch_cmd(2, args + ["run.name=killed"])
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = tmp / "runs" / "killed" / "checkpoints" / "step_000010" / "meta.json"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp / "runs" / "killed" / "summary.json").exists()
    time.sleep(1)
    r = launch(2, args + ["run.name=killed"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    assert max_diff(straight, weights(tmp / "runs" / "killed")) == 0.0
    # and a checkpoint written by 2 processes resumes under 1
    r = launch(1, args + ["run.name=killed", "train.steps=32"])
    assert r.returncode == 0 and "written by 2 process(es), now 1" in r.stdout, r.stderr[-3000:]


def two_nodes(args, envs=(None, None), cwd=ROOT):
    """`metadist train` on two loopback nodes of one process each (node r with envs[r]), waited
    for: (processes, their (stdout, stderr))."""
    port = free_port()
    procs = [
        subprocess.Popen(
            launch_cmd(2, args, port, machines=2, machine_rank=r),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=envs[r],
        )
        for r in (0, 1)
    ]
    return procs, [p.communicate(timeout=600) for p in procs]


@pytest.fixture(scope="module")
def single(base):
    """One process on the local shards: what the two-node runs must equal."""
    tmp, args = base
    r = launch(1, args + ["run.name=single"])
    assert r.returncode == 0, r.stderr[-3000:]
    return weights(tmp / "runs" / "single")


def test_two_nodes_on_loopback_equal_one_process(base, single):
    tmp, args = base
    procs, outs = two_nodes(args + ["run.name=nodes"])
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "on 2 process(es)" in outs[0][0]
    assert max_diff(single, weights(tmp / "runs" / "nodes")) <= WEIGHT_TOL


def lower_kernels() -> dict:
    """Kernel caps below this CPU's own: an AVX2 machine's where this one has AVX-512, else the
    baseline (SSE4.1 for oneDNN, no vectors for ATen)."""
    import torch

    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX"):
        return {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    return {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"}


@pytest.mark.parametrize("reduce", ["exact", pytest.param("fast", marks=pytest.mark.long)])
def test_nodes_with_other_kernels_cannot_be_exact_and_say_so(base, reduce):
    """Two nodes on loopback, the second capped to lower kernels (as a cluster mixing an AVX-512
    and an AVX2 machine): exact mode refuses at start, in one line on each rank, naming what
    differs and what to set; fast mode trains."""
    _tmp, args = base
    a = args + [f"run.name=mixed-{reduce}", f"train.reduce={reduce}", "train.threads=1"]
    env = dict(os.environ)
    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        env.pop(k, None)
    procs, outs = two_nodes(a, [env, dict(env, **lower_kernels())])
    if reduce == "fast":
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        return
    for p, (_, err) in zip(procs, outs):
        assert p.returncode != 0
        said = [ln for ln in err.splitlines() if "the ranks run different kernels" in ln]
        assert said and "onednn_isa NATIVE on rank 0, " in said[0], err[-2000:]
        assert "set ONEDNN_MAX_CPU_ISA" in said[0] and "train.reduce=fast" in said[0]


def test_uneven_split_is_a_clear_error(base):
    _tmp, args = base
    r = launch(3, args + ["run.name=uneven"])
    assert r.returncode != 0
    assert "train.meta_batch_size=8 does not split evenly over 3 processes" in r.stderr


def test_launch_without_process_group_is_an_error(base):
    _tmp, args = base
    # Accelerator(cpu=False) on a CPU machine
    r = launch(2, args + ["run.name=nogroup"], env={"METADIST_CPU": "0"})
    assert r.returncode != 0
    assert "no process group was formed" in r.stderr


def test_offline_tracking_records_config_metrics_and_summary(base):
    from tests.wandb_log import read_run

    tmp, args = base
    r = launch(
        2,
        args + ["run.name=tracked", "tracking.mode=offline", "train.steps=4", "train.val_every=2"],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp / "runs" / "tracked"
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # the main process only
    got = read_run(files[0])
    assert got["run"] == "tracked"
    assert got["config"]["train"]["steps"] == 4 and got["config"]["algo"]["name"] == "maml"
    steps = [h for h in got["history"] if "loss" in h]
    assert [h["_step"] for h in steps] == [1, 2, 3, 4]
    assert all({"loss", "accuracy", "tasks_per_s", "lr", "grad_norm"} <= set(h) for h in steps)
    assert any("val_accuracy" in h for h in got["history"])
    summary = json.loads((run / "summary.json").read_text())
    assert got["summary"]["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert "test_ci95" in got["summary"]
    # a resumed run continues the same W&B run
    r = launch(
        1,
        args + ["run.name=tracked", "tracking.mode=offline", "train.steps=6", "train.val_every=2"],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ids = {p.name.split("-")[-1] for p in run.glob("wandb/offline-run-*")}
    assert ids == {(run / "wandb_id").read_text().strip()}


def _wait_for_steps(metrics, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{metrics}: fewer than {n} steps logged")


def _steps_logged(metrics):
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines()]


def test_sigterm_to_the_launcher_checkpoints_that_step_and_resumes_exactly(base, straight):
    """Preemption with 2 processes: SIGTERM to `accelerate launch` mid-run (no periodic checkpoint
    due): both ranks finish the step, agree where to stop, one checkpoint is written at that step;
    the relaunch resumes there and ends with the uninterrupted run's weights."""
    tmp, args = base
    args = args + KILLED + ["train.checkpoint_every=1000"]  # no periodic checkpoint
    proc = subprocess.Popen(
        launch_cmd(2, args + ["run.name=term"]),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp / "runs" / "term" / "metrics.jsonl"
    _wait_for_steps(metrics, 8, proc)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    at = _steps_logged(metrics)[-1]
    assert 8 <= at < 30 and f"after step {at}" in err
    assert sorted(p.name for p in (tmp / "runs" / "term" / "checkpoints").iterdir()) == [
        f"step_{at:06d}"
    ]
    r = launch(2, args + ["run.name=term"])
    assert r.returncode == 0 and f"from step_{at:06d}" in r.stdout, r.stderr[-3000:]
    assert max_diff(straight, weights(tmp / "runs" / "term")) == 0.0


def test_a_stopped_rank_fails_the_launch_within_the_collective_timeout(base, straight):
    """SIGSTOP on one worker (a rank that stops without dying): the other times out in the
    all-reduce after train.collective_timeout_s, the launch exits non-zero, and a relaunch resumes
    exactly from the last checkpoint."""
    tmp, args = base
    args = args + KILLED + ["train.collective_timeout_s=10"]
    proc = subprocess.Popen(
        launch_cmd(2, args + ["run.name=stuck"]),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for_steps(tmp / "runs" / "stuck" / "metrics.jsonl", 6, proc)
    workers = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    assert len(workers) == 2, workers
    stopped = time.time()
    os.kill(workers[1], signal.SIGSTOP)
    try:
        _out, err = proc.communicate(timeout=10 + 60)
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
    assert proc.returncode != 0 and time.time() - stopped < 10 + 60
    assert "collective_timeout_s=10" in err and "rank 0" in err
    r = launch(2, args + ["run.name=stuck"])
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-3000:]
    assert max_diff(straight, weights(tmp / "runs" / "stuck")) == 0.0


def test_workers_stop_when_their_launcher_is_killed(base):
    """SIGKILL to the launcher alone: its workers get SIGTERM (PR_SET_PDEATHSIG), checkpoint and
    exit instead of training on as orphans; the relaunch then owns the folder and resumes."""
    tmp, args = base
    args = args + [
        "train.steps=400",
        "train.checkpoint_every=1000",
        "train.val_every=1000",
        "model.hidden=32",
    ]
    proc = subprocess.Popen(
        launch_cmd(2, args + ["run.name=orphan"]),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_steps(tmp / "runs" / "orphan" / "metrics.jsonl", 3, proc)
    workers = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(
        os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"
        for w in workers
    ):
        time.sleep(0.1)
    alive = [
        w
        for w in workers
        if os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"
    ]
    assert not alive, f"orphaned workers still running: {alive}"
    ckpts = list((tmp / "runs" / "orphan" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not (tmp / "runs" / "orphan" / "summary.json").exists()
    r = launch(2, args + ["run.name=orphan", "train.steps=" + str(int(ckpts[0].name[5:]) + 2)])
    assert r.returncode == 0 and f"from {ckpts[0].name}" in r.stdout, r.stderr[-3000:]


def test_two_nodes_stream_their_shards_over_http_without_raw_data(base, single, http_server):
    """The 2-node loopback launch with its shards served over HTTP from 127.0.0.1 and no raw data
    in its environment equals one process on the local folder."""
    tmp, args = base
    url = http_server(tmp / "shards")
    env = {k: v for k, v in os.environ.items() if k != "OMNIGLOT_DIR"}
    a = [x for x in args if not x.startswith(("data.raw=", "data.shards="))] + [
        f"data.shards={url}",
        "run.name=http-nodes",
    ]
    procs, outs = two_nodes(a, [env, env], cwd=tmp)
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    nodes = load_weights(tmp / "runs" / "http-nodes" / "model.safetensors")[0]
    assert max_diff(single, nodes) <= WEIGHT_TOL


@pytest.mark.long
def test_maml_plus_plus_settings_are_world_size_invariant_and_resume_exactly(base):
    """Per-step rates, the multi-step loss (annealed across the resume point) and per-step
    BatchNorm weights: 2 processes equal 1 bit for bit, and a 2-process run resumed midway equals
    one that was not. One thread a process in both (as the 1-2-4 test): a process's thread count
    changes its kernels' rounding, which these settings amplify (on an AMD Zen 3, 2 threads
    against 1 each: 4e-4 after 6 steps)."""
    tmp, args = base
    args = args + [
        "train.threads=1",
        "algo.learn_inner_lr=layer_step",
        "algo.multi_step_loss=4",
        "algo.per_step_bn=true",
        "train.steps=6",
        "train.checkpoint_every=3",
        "train.val_every=3",
    ]
    for n, name in ((1, "pp1"), (2, "pp2")):
        r = launch(n, args + [f"run.name={name}"])
        assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(weights(tmp / "runs" / "pp1"), weights(tmp / "runs" / "pp2")) == 0.0
    r = launch(2, args + ["run.name=pp-resumed", "train.steps=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(2, args + ["run.name=pp-resumed"])
    assert r.returncode == 0 and "from step_000003" in r.stdout, r.stderr[-3000:]
    assert max_diff(weights(tmp / "runs" / "pp2"), weights(tmp / "runs" / "pp-resumed")) == 0.0
