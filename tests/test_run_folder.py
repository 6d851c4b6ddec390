"""The run folder is taken by one launch at a time (real processes): a second launch names the
holder and exits 2; the lock of a process that died is taken over."""

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, run_cli, small_overrides


def test_second_launch_on_a_busy_folder_names_the_holder_and_a_dead_holder_is_taken_over(
    omniglot_dir, tmp_path
):
    args = small_overrides(
        omniglot_dir,
        tmp_path,
        **{"train.steps": 400, "train.val_every": 1000, "train.checkpoint_every": 1000},
    )
    r = run_cli("prepare", *args)
    assert r.returncode == 0, r.stderr
    first = subprocess.Popen(
        [sys.executable, "-m", "metadist", "train", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        r = run_cli("train", *args)
        assert r.returncode == 2
        line = r.stderr.strip().splitlines()[-1]
        assert (
            f"pid={first.pid}" in line
            and "is in use" in line
            and str(tmp_path / "runs" / "t") in line
        )
        assert first.poll() is None  # the first launch goes on undisturbed
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    r = run_cli("train", *args, "train.steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"took over the lock of process {first.pid}, which is gone" in r.stdout
