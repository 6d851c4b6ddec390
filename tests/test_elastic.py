"""Elastic training through torchrun (launch/torchrun/elastic.sh) on 127.0.0.1: two agents, one
process each, the rendezvous store run apart (launch/torchrun/store.py) so either may leave.
A node leaves gracefully, comes back, dies abruptly; the run completes with the weights of an
uninterrupted 1-process run, bit for bit. And a real error still ends the job after its restarts.
Every wait has a deadline: a hang fails the test instead of blocking CI."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from metadist.checkpoint import load_weights
from metadist.distributed import free_port
from tests.conftest import ROOT, run_cli, small_overrides

pytestmark = pytest.mark.slow
STEPS = 100


@pytest.fixture(scope="module")
def elastic(tmp_path_factory, omniglot_dir):
    tmp = tmp_path_factory.mktemp("elastic")
    args = small_overrides(
        omniglot_dir,
        tmp,
        **{
            "train.steps": STEPS,
            "train.val_every": 1000,
            "train.checkpoint_every": 10,
            "model.hidden": 16,
            "train.threads": 1,
            "train.log_every": 1,
        },
    )
    r = run_cli("prepare", *args)
    assert r.returncode == 0, r.stderr
    port = free_port()
    store = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "launch/torchrun/store.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert "serving" in store.stdout.readline()
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        RDZV_ENDPOINT=f"127.0.0.1:{port}",
        NNODES="1:2",
        RDZV_CONF="is_host=false,last_call_timeout=2",
        TORCHRUN=str(ROOT / ".venv/bin/torchrun")
        if (ROOT / ".venv/bin/torchrun").exists()
        else "torchrun",
    )
    yield tmp, args, env
    store.terminate()
    store.wait()


def start_agent(tmp, args, env, name, run, **extra):
    log = open(tmp / f"{run}-{name}.log", "a")
    return subprocess.Popen(
        ["bash", str(ROOT / "launch/torchrun/elastic.sh"), *args, f"run.name={run}"],
        cwd=ROOT,
        env=dict(env, RDZV_ID=run, **extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def last_step(metrics):
    try:
        return json.loads(metrics.read_text().splitlines()[-1])["step"]
    except (OSError, IndexError, ValueError):
        return 0


def wait_for(cond, what, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def kill_all(*procs):
    for p in procs:
        if p.poll() is None:
            for c in children(p.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c, signal.SIGKILL)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_nodes_leave_and_join_and_the_run_ends_bit_identical(elastic):
    tmp, args, env = elastic
    r = subprocess.run(
        [sys.executable, "-m", "metadist", "train", *args, "run.name=straight"],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = tmp / "runs" / "el" / "metrics.jsonl"
    logs = lambda: (tmp / "el-A.log").read_text() + (tmp / "el-B.log").read_text()
    a = start_agent(tmp, args, env, "A", "el", MAX_RESTARTS="5")
    b = start_agent(tmp, args, env, "B", "el", MAX_RESTARTS="5")
    try:
        wait_for(
            lambda: "2 process(es)" in logs() and last_step(metrics) >= 15,
            "15 steps on 2 processes",
        )
        # A restart's line is counted from before the action: under load agent A may form the
        # first round alone and restart at 2 processes when B joins ("now 2)" already logged).
        ones, twos = logs().count("now 1)"), logs().count("now 2)")
        # 1. graceful: SIGTERM to agent B, as a cluster does before reclaiming a node
        b.send_signal(signal.SIGTERM)
        b.wait(timeout=120)
        wait_for(lambda: logs().count("now 1)") > ones, "the restart at world size 1")
        resumed = int(logs().split("now 1)")[ones].rsplit("from step_", 1)[1][:6])
        logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
        # the step reached: nothing lost
        assert resumed == max(s for s in logged if s <= resumed) and resumed >= 15
        wait_for(lambda: last_step(metrics) >= resumed + 10, "10 steps on 1 process")
        # 2. the node comes back: the job goes back to 2 processes
        b = start_agent(tmp, args, env, "B", "el", MAX_RESTARTS="5")
        wait_for(lambda: logs().count("now 2)") > twos, "the restart at world size 2")
        back = last_step(metrics)
        wait_for(lambda: last_step(metrics) >= back + 15, "15 more steps on 2 processes")
        # 3. abrupt: agent B frozen, its worker and then the agent SIGKILLed
        os.kill(b.pid, signal.SIGSTOP)
        killed_at = last_step(metrics)
        kill_all(b)
        wait_for(
            lambda: logs().count("now 1)") > ones + 1, "the restart after the loss", timeout=300
        )
        again = int(logs().split("now 1)")[ones + 1].rsplit("from step_", 1)[1][:6])
        # the last periodic checkpoint
        assert again % 10 == 0 and killed_at - 10 <= again <= killed_at + 1
        assert a.wait(timeout=600) == 0, logs()[-3000:]
    finally:
        kill_all(a, b)
    assert "test accuracy" in logs()
    straight = load_weights(tmp / "runs" / "straight" / "model.safetensors")[0]
    el = load_weights(tmp / "runs" / "el" / "model.safetensors")[0]
    assert all(straight[k].equal(el[k]) for k in straight)
    s = json.loads((tmp / "runs" / "el" / "summary.json").read_text())
    assert s["steps"] == STEPS and s["world_size"] == 1


def test_a_real_error_fails_the_job_after_its_restarts(elastic, tmp_path):
    """A worker that fails for a reason restarts cannot mend (its shards folder holds another
    split) ends the job after MAX_RESTARTS restarts, its error line in the output."""
    tmp, args, env = elastic
    bad = args + ["data.val_episodes=32"]  # the prepared folder holds 16 val episodes
    a = start_agent(tmp, bad, env, "A", "bad", MAX_RESTARTS="2", NNODES="1:1")
    try:
        code = a.wait(timeout=300)
    finally:
        kill_all(a)
    out = (tmp / "bad-A.log").read_text()
    assert code != 0
    # 1 try + 2 restarts
    assert out.count("holds another val split (data.val_episodes=16 there, 32 asked)") == 3
    assert "Traceback" not in out.split("holds another val split")[0].rsplit("\n", 3)[-1]
