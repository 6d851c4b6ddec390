"""Real Omniglot (../shared/data/omniglot), bounded in steps: 150 steps of strong.yaml on one
process must reach at least 0.80 test accuracy on the first 160 of the 640 fixed test tasks."""
import json

import pytest

from tests.conftest import REAL_OMNIGLOT, run_cli

pytestmark = pytest.mark.slow


def test_strong_150_steps_on_real_omniglot(tmp_path):
    assert REAL_OMNIGLOT.is_dir(), f"the real Omniglot is expected at {REAL_OMNIGLOT}"
    r = run_cli("train", "--config", "configs/strong.yaml", f"data.raw={REAL_OMNIGLOT}", f"data.shards={tmp_path / 'shards'}",
                "data.train_episodes=5000", "train.steps=150", "train.val_every=75", "train.checkpoint_every=150",
                "eval.test_episodes=160", f"run.root={tmp_path / 'runs'}", "run.name=real", "tracking.mode=disabled",
                timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "real" / "summary.json").read_text())
    assert s["steps"] == 150 and s["test_episodes"] == 160
    assert s["test_accuracy"] >= 0.80, s
    # the final checkpoint is self-describing and evaluates like the run's own summary did
    r = run_cli("evaluate", "--run", tmp_path / "runs" / "real" / "checkpoints" / "step_000150", "eval.test_episodes=160")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["episodes"] == 160
