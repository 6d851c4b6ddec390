"""Evaluation and prediction: predict on exported tasks equals evaluate; bad task folders and bad
weights give one clear line and exit 2."""

import csv
import json

from metadist.checkpoint import load_weights
from tests.conftest import run_cli


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
    truth = list(range(5)) * 24  # query image j of every task is class j
    acc = sum(int(x[1]) == t for x, t in zip(rows[1:], truth)) / len(truth)
    assert abs(acc - ev["accuracy"]) < 1e-6  # per-episode accuracies are float32


def test_predict_input_errors(trained, tmp_path):
    tmp, args, _ = trained
    run = tmp / "runs" / "t"
    (tmp_path / "empty" / "support").mkdir(parents=True)
    (tmp_path / "empty" / "query").mkdir(parents=True)
    r = run_cli("predict", "--run", run, "--tasks", tmp_path / "empty", "--out", tmp_path / "o.csv")
    assert r.returncode == 2 and "no task folders" in r.stderr
    r = run_cli("export-tasks", *args, "--split", "test", "--out", tmp_path / "t", "--limit", "2")
    five = tmp_path / "t" / "support" / "0001" / "image_4.png"
    five.rename(five.with_name("image_5.png.kept"))
    # a 4-way task: the learned head's first 4 rows adapt to it, as the API adapts it
    r = run_cli("predict", "--run", run, "--tasks", tmp_path / "t", "--out", tmp_path / "o.csv")
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "o.csv").read_text().split()[1:]
    assert len(rows) == 10 and all(int(row.split(",")[1]) < 4 for row in rows[5:])
    # a 6-way task: more classes than the head's 5 rows
    five.with_name("image_5.png.kept").rename(five.with_name("image_5.png"))
    five.write_bytes(five.with_name("image_0.png").read_bytes())
    r = run_cli("predict", "--run", run, "--tasks", tmp_path / "t", "--out", tmp_path / "o.csv")
    assert r.returncode == 2 and "task 0001" in r.stderr and "6 classes" in r.stderr, r.stderr
    five.write_bytes(b"not a png")
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

    save_file(
        weights,
        str(tmp_path / "other.safetensors"),
        metadata={k: json.dumps(v) for k, v in meta.items()},
    )
    r = run_cli("evaluate", "--run", tmp_path / "other.safetensors")
    assert r.returncode == 2 and "do not fit the architecture" in r.stderr
    r = run_cli("train", *args, "algo.name=reptile")
    assert r.returncode == 2 and "algo.name" in r.stderr and "maml" in r.stderr
    r = run_cli("train", *args, "train.cuda_graph=on", "run.name=graph")
    assert r.returncode == 2 and "train.cuda_graph is now algo.compile" in r.stderr
