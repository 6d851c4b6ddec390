"""Meta-training end to end on the synthetic set (single process): run folder contents,
evaluate and predict agree, debug mode, and bad input gives one clear line and exit 2."""
import csv
import json

import pytest
import torch

from metadist import config
from metadist.checkpoint import load_weights
from metadist.checkpoint import load_model
from tests.conftest import run_cli, small_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory, omniglot_dir):
    tmp = tmp_path_factory.mktemp("trained")
    args = small_overrides(omniglot_dir, tmp, **{"train.steps": 6, "train.val_every": 3})
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, args, r


def test_run_folder_has_everything(trained):
    tmp, _, r = trained
    run = tmp / "runs" / "t"
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "best.safetensors", "summary.json"):
        assert (run / name).is_file(), name
    assert config.load(run / "config.yaml").data.shards == str(tmp / "shards")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "accuracy", "tasks_per_s", "lr", "grad_norm"} <= set(recs[0])
    assert "val_accuracy" in recs[2] and "val_accuracy" in recs[5]
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 6 and s["test_episodes"] == 24 and 0 <= s["test_accuracy"] <= 1 and s["test_ci95"] >= 0
    assert "test accuracy" in r.stdout
    # final checkpoint is complete and readable
    assert (run / "checkpoints" / "step_000006" / "meta.json").is_file()


def test_weights_are_self_describing(trained):
    tmp, _, _ = trained
    model, cfg = load_model(tmp / "runs" / "t")
    assert cfg.model.hidden == 8 and model.hidden == 8
    weights, meta = load_weights(tmp / "runs" / "t" / "model.safetensors")
    assert meta["step"] == 6 and set(weights) == set(model.state_dict())


def test_predict_on_exported_tasks_equals_evaluate(trained):
    tmp, args, _ = trained
    run = tmp / "runs" / "t"
    r = run_cli("evaluate", "--run", run)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["episodes"] == 24
    r = run_cli("export-tasks", *args, "--split", "test", "--out", tmp / "tasks")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("predict", "--run", run, "--tasks", tmp / "tasks", "--out", tmp / "out.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.reader(open(tmp / "out.csv")))
    assert rows[0] == ["id", "class"] and len(rows) == 1 + 24 * 5
    assert [int(x[0]) for x in rows[1:]] == list(range(120))
    truth = list(range(5)) * 24                        # query image j of every task is class j
    acc = sum(int(x[1]) == t for x, t in zip(rows[1:], truth)) / len(truth)
    assert abs(acc - ev["accuracy"]) < 1e-6          # per-episode accuracies are float32


def test_predict_input_errors(trained, tmp_path):
    tmp, args, _ = trained
    run = tmp / "runs" / "t"
    (tmp_path / "empty" / "support").mkdir(parents=True)
    (tmp_path / "empty" / "query").mkdir(parents=True)
    r = run_cli("predict", "--run", run, "--tasks", tmp_path / "empty", "--out", tmp_path / "o.csv")
    assert r.returncode == 2 and "no task folders" in r.stderr
    r = run_cli("export-tasks", *args, "--split", "test", "--out", tmp_path / "t", "--limit", "2")
    (tmp_path / "t" / "support" / "0001" / "image_4.png").unlink()          # a 4-way task
    r = run_cli("predict", "--run", run, "--tasks", tmp_path / "t", "--out", tmp_path / "o.csv")
    assert r.returncode == 2 and "task 0001" in r.stderr and "4 support images" in r.stderr
    (tmp_path / "t" / "support" / "0001" / "image_4.png").write_bytes(b"not a png")
    r = run_cli("predict", "--run", run, "--tasks", tmp_path / "t", "--out", tmp_path / "o.csv")
    assert r.returncode == 2 and "image_4.png" in r.stderr


def test_bad_runs_and_weights(trained, tmp_path):
    tmp, args, _ = trained
    r = run_cli("evaluate", "--run", tmp_path)
    assert r.returncode == 2 and "no best.safetensors or model.safetensors" in r.stderr
    # weights whose config names another architecture
    weights, meta = load_weights(tmp / "runs" / "t" / "model.safetensors")
    meta["config"]["model"]["hidden"] = 16
    from safetensors.torch import save_file
    save_file(weights, str(tmp_path / "other.safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()})
    r = run_cli("evaluate", "--run", tmp_path / "other.safetensors")
    assert r.returncode == 2 and "do not fit the architecture" in r.stderr
    r = run_cli("train", *args, "algo.name=reptile")
    assert r.returncode == 2 and "algo.name" in r.stderr and "maml" in r.stderr
    if not torch.cuda.is_available():
        r = run_cli("train", *args, "train.cuda_graph=on", "run.name=graph")
        assert r.returncode == 2 and "train.cuda_graph=on needs a CUDA device" in r.stderr


def test_plot_makes_a_png(trained):
    tmp, _, _ = trained
    r = run_cli("plot", tmp / "runs" / "t", "--out", tmp / "curves.png")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("algo", ["fomaml", "anil", "transfer"])
def test_every_algorithm_trains(omniglot_dir, tmp_path, algo):
    from metadist.train import train
    cfg = config.load(None, small_overrides(omniglot_dir, tmp_path, **{"algo.name": algo, "train.steps": 2,
                                                                       "data.task_aug": 0.4}))
    s = train(cfg, log=lambda *a: None)
    assert s["steps"] == 2 and s["algorithm"] == algo


def test_learned_inner_lrs_train_save_and_evaluate(omniglot_dir, tmp_path):
    args = small_overrides(omniglot_dir, tmp_path, **{"algo.learn_inner_lr": "layer", "train.steps": 3})
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    weights, _ = load_weights(run / "model.safetensors")
    lrs = {k: v for k, v in weights.items() if k.startswith("inner_lr.")}
    assert len(lrs) == len(weights) - len(lrs) and all(v.numel() == 1 for v in lrs.values())
    assert any(abs(v.item() - 0.4) > 1e-6 for v in lrs.values())      # they moved: meta-learned
    model, cfg = load_model(run)
    assert cfg.algo.learn_inner_lr == "layer"
    r = run_cli("evaluate", "--run", run)
    assert r.returncode == 0, r.stderr[-2000:]


def test_debug_mode_cross_checks_and_stops_on_nan(omniglot_dir, tmp_path):
    r = run_cli("train", "--debug", *small_overrides(omniglot_dir, tmp_path, **{"train.steps": 2}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batched vs loop meta-gradient agree" in r.stdout
    r = run_cli("train", "--debug", *small_overrides(omniglot_dir, tmp_path, **{"train.steps": 2, "algo.inner_lr": 1e30,
                                                                                "run.name": "nan"}))
    assert r.returncode == 2 and "step 1" in r.stderr and "non-finite" in r.stderr


def test_resume_continues_an_existing_run(omniglot_dir, tmp_path):
    from metadist.train import train
    base = small_overrides(omniglot_dir, tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2})
    full = train(config.load(None, base + ["run.name=full"]), log=lambda *a: None)
    train(config.load(None, base + ["run.name=part", "train.steps=2"]), log=lambda *a: None)
    said = []
    part = train(config.load(None, base + ["run.name=part"]), log=said.append)
    assert any("resuming" in s and "step_000002" in s for s in said)
    a, _ = load_weights(tmp_path / "runs" / "full" / "model.safetensors")
    b, _ = load_weights(tmp_path / "runs" / "part" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert part["test_accuracy"] == full["test_accuracy"]
