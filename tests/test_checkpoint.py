"""Weights files and checkpoints: self-describing weights, atomic checkpoints, a failed write
that loses nothing."""

import torch

from metadist.checkpoint import load_model, load_weights
from tests.conftest import run_cli, small_overrides


def test_weights_are_self_describing(trained):
    tmp, _, _ = trained
    model, cfg = load_model(tmp / "runs" / "t")
    assert cfg.model.hidden == 8 and model.hidden == 8
    weights, meta = load_weights(tmp / "runs" / "t" / "model.safetensors")
    assert meta["step"] == 6 and set(weights) == set(model.state_dict())


def test_failed_checkpoint_write_loses_nothing(omniglot_dir, tmp_path):
    """A real write that fails midway (the file-size limit makes optimizer.pt's write fail with
    EFBIG after its first bytes): the error names the path, the previous checkpoint stays
    complete, no half-written folder is found by resume, and the relaunch ends where an
    uninterrupted run does."""
    import resource
    import signal
    import subprocess
    import sys

    from metadist.checkpoint import CheckpointManager
    from tests.conftest import ROOT

    args = small_overrides(
        omniglot_dir,
        tmp_path,
        **{"train.steps": 4, "train.checkpoint_every": 2, "model.hidden": 16},
    )
    assert run_cli("train", *args, "run.name=straight").returncode == 0
    assert run_cli("train", *args, "run.name=t", "train.steps=2").returncode == 0
    run = tmp_path / "runs" / "t"
    model_bytes = (run / "checkpoints" / "step_000002" / "model.safetensors").stat().st_size
    # model files fit, optimizer.pt (two Adam moments) does not
    limit = int(1.5 * model_bytes)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(
        [sys.executable, "-m", "metadist", "train", *map(str, args), "run.name=t"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert (
        "cannot write checkpoint" in line
        and "step_000004" in line
        and "step_000002 is intact" in line
    )
    assert "Traceback" not in r.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    assert CheckpointManager(run, 2, 2, False, None, {}).latest().name == "step_000002"
    r = run_cli("train", *args, "run.name=t")
    assert r.returncode == 0 and "from step_000002" in r.stdout, r.stderr[-2000:]
    a = load_weights(tmp_path / "runs" / "straight" / "model.safetensors")[0]
    b = load_weights(run / "model.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
