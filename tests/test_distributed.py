"""Distributed meta-training on CPU (gloo), through the real `accelerate launch`: world-size
invariance (1/2/4 processes), SIGKILL + resume, two-node loopback, start-up errors, clean exits.

Tolerance for "the same weights": float32 all-reduce sums the per-rank meta-gradients in another
order than one process does, so weights agree to WEIGHT_TOL (max absolute difference after 3
Adam steps at lr 1e-3, i.e. under 1% of one step); losses to 1e-5 relative.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from metadist.checkpoint import load_weights
from tests.conftest import ROOT, accelerate_bin, free_port, run_cli, small_overrides

pytestmark = pytest.mark.slow
WEIGHT_TOL = 1e-5


def launch_cmd(nproc: int, args, port=None, machines=1, machine_rank=0):
    if nproc == 1 and machines == 1:
        return [sys.executable, "-m", "metadist", "train", *map(str, args)]
    cmd = [accelerate_bin(), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", str(machines),
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port or free_port())]
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return cmd + ["-m", "metadist", "train", *map(str, args)]


def train(nproc, args, env=None, timeout=600):
    r = subprocess.run(launch_cmd(nproc, args), capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    return r


def weights(run_dir):
    return load_weights(run_dir / "model.safetensors")[0]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def base(tmp_path_factory, omniglot_dir):
    tmp = tmp_path_factory.mktemp("dist")
    args = small_overrides(omniglot_dir, tmp, **{"train.steps": 3, "train.val_every": 3, "train.checkpoint_every": 3,
                                                 "algo.inner_steps": 2, "model.hidden": 16})
    r = run_cli("prepare", *args)            # shards once, before the ranks start
    assert r.returncode == 0, r.stderr
    return tmp, args


def test_1_2_4_processes_give_the_same_training(base):
    tmp, args = base
    runs = {}
    for n in (1, 2, 4):
        r = train(n, args + [f"run.name=w{n}"])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[n] = tmp / "runs" / f"w{n}"
        assert f"on {n} process(es)" in r.stdout
    ref = weights(runs[1])
    ref_metrics = [json.loads(x) for x in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    for n in (2, 4):
        assert max_diff(ref, weights(runs[n])) <= WEIGHT_TOL, n
        m = [json.loads(x) for x in (runs[n] / "metrics.jsonl").read_text().splitlines()]
        for a, b in zip(ref_metrics, m):
            assert a["step"] == b["step"]
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
            assert abs(a["accuracy"] - b["accuracy"]) < 1e-6
        s1, sn = (json.loads((runs[k] / "summary.json").read_text()) for k in (1, n))
        assert sn["world_size"] == n and abs(s1["test_accuracy"] - sn["test_accuracy"]) < 1e-6


def test_sigkill_and_resume_equals_uninterrupted(base):
    tmp, args = base
    args = args + ["train.steps=40", "train.checkpoint_every=5", "train.val_every=20", "model.hidden=32"]
    r = train(2, args + ["run.name=straight"])
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = launch_cmd(2, args + ["run.name=killed"])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp / "runs" / "killed" / "checkpoints" / "step_000010" / "meta.json"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp / "runs" / "killed" / "summary.json").exists()
    time.sleep(1)
    r = train(2, args + ["run.name=killed"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    a, b = weights(tmp / "runs" / "straight"), weights(tmp / "runs" / "killed")
    assert max_diff(a, b) == 0.0
    # and a checkpoint written by 2 processes resumes under 1
    r = train(1, args + ["run.name=killed", "train.steps=45"])
    assert r.returncode == 0 and "written by 2 process(es), now 1" in r.stdout, r.stderr[-3000:]


def test_two_nodes_on_loopback_equal_one_process(base):
    tmp, args = base
    port = free_port()
    a = args + ["run.name=nodes"]
    procs = [subprocess.Popen(launch_cmd(2, a, port, machines=2, machine_rank=r), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "on 2 process(es)" in outs[0][0]
    r = train(1, args + ["run.name=single"])
    assert r.returncode == 0
    assert max_diff(weights(tmp / "runs" / "single"), weights(tmp / "runs" / "nodes")) <= WEIGHT_TOL


def test_uneven_split_is_a_clear_error(base):
    tmp, args = base
    r = train(3, args + ["run.name=uneven"])
    assert r.returncode != 0
    assert "train.meta_batch_size=8 does not split evenly over 3 processes" in r.stderr


def test_launch_without_process_group_is_an_error(base):
    tmp, args = base
    r = train(2, args + ["run.name=nogroup"], env={"METADIST_CPU": "0"})   # Accelerator(cpu=False) on a CPU machine
    assert r.returncode != 0
    assert "no process group was formed" in r.stderr


def test_twenty_consecutive_two_process_launches_exit_zero(base):
    tmp, args = base
    for i in range(20):
        r = train(2, args + [f"run.name=rep{i}", "train.steps=1", "train.val_every=1", "eval.test_episodes=8"])
        assert r.returncode == 0, (i, r.stderr[-3000:])


def test_offline_tracking_records_config_metrics_and_summary(base):
    from tests.wandb_log import read_run
    tmp, args = base
    r = train(2, args + ["run.name=tracked", "tracking.mode=offline", "train.steps=4", "train.val_every=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp / "runs" / "tracked"
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files          # the main process only
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
    r = train(1, args + ["run.name=tracked", "tracking.mode=offline", "train.steps=6", "train.val_every=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    ids = {p.name.split("-")[-1] for p in run.glob("wandb/offline-run-*")}
    assert ids == {(run / "wandb_id").read_text().strip()}
