"""Meta-training end to end on the synthetic set (single process): the run folder, every algorithm,
learned inner rates, debug mode, resume, and the knobs of the loop."""

import json
import math

import pytest
import torch

from metadist import config
from metadist.checkpoint import load_model, load_weights
from tests.conftest import model_for, run_cli, small_overrides


def test_run_folder_has_everything(trained):
    tmp, _, r = trained
    run = tmp / "runs" / "t"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "model.safetensors",
        "best.safetensors",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    assert config.load(run / "config.yaml").data.shards == str(tmp / "shards")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "accuracy", "tasks_per_s", "lr", "grad_norm"} <= set(recs[0])
    assert "val_accuracy" in recs[2] and "val_accuracy" in recs[5]
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 6 and s["test_episodes"] == 24 and "test accuracy" in r.stdout
    # the summary is the best weights on the test split: what `metadist evaluate` finds again
    r2 = run_cli("evaluate", "--run", run)
    assert r2.returncode == 0, r2.stderr[-2000:]
    ev = json.loads(r2.stdout.strip().splitlines()[-1])
    assert (ev["accuracy"], ev["ci95"], ev["episodes"]) == (
        s["test_accuracy"],
        s["test_ci95"],
        24,
    )
    # stderr is a file here (as in SLURM's .out or CI): one plain line per log step, no progress bar
    lines = [x for x in r.stdout.splitlines() if x.startswith("step ") and "/6: loss" in x]
    assert [x.split("/")[0] for x in lines] == [
        f"step {i}" for i in range(1, 7)
    ] and "tasks/s" in lines[0]
    assert "\r" not in r.stdout + r.stderr
    # final checkpoint is complete and readable
    assert (run / "checkpoints" / "step_000006" / "meta.json").is_file()


@pytest.mark.parametrize("algo", ["fomaml", "anil", "transfer"])
def test_every_algorithm_trains(omniglot_dir, tmp_path, algo):
    from metadist.train import train

    cfg = config.load(
        None,
        small_overrides(
            omniglot_dir, tmp_path, **{"algo.name": algo, "train.steps": 2, "data.task_aug": 0.4}
        ),
    )
    s = train(cfg, log=lambda *a: None)
    assert s["steps"] == 2 and s["algorithm"] == algo
    torch.manual_seed(cfg.seed)  # the run's own initialisation
    start = model_for(cfg).state_dict()
    end = load_weights(tmp_path / "runs" / "t" / "model.safetensors")[0]
    assert set(end) == set(start)
    still = [k for k in start if torch.equal(start[k], end[k])]
    assert not still, f"{algo}: these weights did not move in 2 steps: {still}"


def test_learned_inner_lrs_train_save_and_evaluate(omniglot_dir, tmp_path):
    args = small_overrides(
        omniglot_dir, tmp_path, **{"algo.learn_inner_lr": "layer", "train.steps": 3}
    )
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    weights, _ = load_weights(run / "model.safetensors")
    lrs = {k: v for k, v in weights.items() if k.startswith("inner_lr.")}
    assert len(lrs) == len(weights) - len(lrs) and all(v.numel() == 1 for v in lrs.values())
    assert any(abs(v.item() - 0.4) > 1e-6 for v in lrs.values())  # they moved: meta-learned
    _model, cfg = load_model(run)
    assert cfg.algo.learn_inner_lr == "layer"
    r = run_cli("evaluate", "--run", run)
    assert r.returncode == 0, r.stderr[-2000:]


def test_debug_mode_cross_checks_and_stops_on_nan(omniglot_dir, tmp_path):
    r = run_cli("train", "--debug", *small_overrides(omniglot_dir, tmp_path, **{"train.steps": 2}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tasks at once and one at a time agree" in r.stdout
    r = run_cli(
        "train",
        "--debug",
        *small_overrides(
            omniglot_dir, tmp_path, **{"train.steps": 2, "algo.inner_lr": 1e30, "run.name": "nan"}
        ),
    )
    assert r.returncode == 2 and "step 1" in r.stderr and "non-finite" in r.stderr


def test_resume_continues_an_existing_run(omniglot_dir, tmp_path):
    from metadist.train import train

    base = small_overrides(
        omniglot_dir, tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2}
    )
    full = train(config.load(None, base + ["run.name=full"]), log=lambda *a: None)
    train(config.load(None, base + ["run.name=part", "train.steps=2"]), log=lambda *a: None)
    said = []
    part = train(config.load(None, base + ["run.name=part"]), log=said.append)
    assert any("resuming" in s and "step_000002" in s for s in said)
    a, _ = load_weights(tmp_path / "runs" / "full" / "model.safetensors")
    b, _ = load_weights(tmp_path / "runs" / "part" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert part["test_accuracy"] == full["test_accuracy"]


def test_max_minutes_stops_checkpoints_and_tests(omniglot_dir, tmp_path):
    from metadist.train import train

    said = []
    cfg = config.load(
        None,
        small_overrides(
            omniglot_dir,
            tmp_path,
            **{"train.steps": 50, "train.max_minutes": 1e-6, "train.checkpoint_every": 100},
        ),
    )
    s = train(cfg, log=said.append)
    assert s["steps"] == 1 and any("train.max_minutes=1e-06 reached at step 1" in x for x in said)
    run = tmp_path / "runs" / "t"
    assert (run / "checkpoints" / "step_000001" / "meta.json").is_file() and (
        run / "summary.json"
    ).is_file()


def test_keep_checkpoints_keeps_the_last_k(omniglot_dir, tmp_path):
    from metadist.train import train

    train(
        config.load(
            None,
            small_overrides(
                omniglot_dir,
                tmp_path,
                **{"train.steps": 5, "train.checkpoint_every": 1, "train.keep_checkpoints": 2},
            ),
        ),
        log=lambda *a: None,
    )
    names = sorted(p.name for p in (tmp_path / "runs" / "t" / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000005"]


def test_run_fresh_starts_over(omniglot_dir, tmp_path):
    from metadist.train import train

    base = small_overrides(
        omniglot_dir, tmp_path, **{"train.steps": 2, "train.checkpoint_every": 2}
    )
    train(config.load(None, base), log=lambda *a: None)
    run = tmp_path / "runs" / "t"
    (run / "stale.txt").write_text("from the old run")
    said = []
    train(config.load(None, base + ["train.steps=4", "run.fresh=true"]), log=said.append)
    assert not any("resuming" in s for s in said) and not (run / "stale.txt").exists()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    said = []
    # and without it, resumes
    train(config.load(None, base + ["train.steps=6"]), log=said.append)
    assert any("resuming" in s and "step_000004" in s for s in said)


def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(omniglot_dir, tmp_path):
    """One process, a real SIGTERM mid-run: it finishes the step, writes a checkpoint at that step,
    exits 75; launching again resumes there and ends with the weights of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    args = small_overrides(
        omniglot_dir,
        tmp_path,
        **{
            "train.steps": 60,
            "train.checkpoint_every": 1000,
            "train.val_every": 1000,
            "model.hidden": 16,
        },
    )
    r = run_cli("train", *args, "run.name=straight")
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "metadist", "train", *map(str, args), "run.name=stopped"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "runs" / "stopped" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 5
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    # log_every=1: one record per finished step
    at = len(metrics.read_text().splitlines())
    assert 5 <= at < 60 and f"after step {at}" in err and "launch the same command again" in err
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "stopped" / "checkpoints").iterdir())
    # written at the signal's step (none was due)
    assert ckpts == [f"step_{at:06d}"]
    r = run_cli("train", *args, "run.name=stopped")
    assert r.returncode == 0 and f"from step_{at:06d}" in r.stdout, r.stderr[-2000:]
    a = load_weights(tmp_path / "runs" / "straight" / "model.safetensors")[0]
    b = load_weights(tmp_path / "runs" / "stopped" / "model.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_strategy_is_a_property_of_the_machine_and_the_shape(
    omniglot_dir, tmp_path, monkeypatch
):
    """algo.strategy=auto measures the tasks computed at once once per machine and task shape and
    caches the answer: whatever this CPU measured, the run uses the fastest size of the record,
    the same command twice gives bit-identical weights, a resumed run keeps its checkpoint's plan
    whatever the cache says later, and another shape is measured anew."""
    from metadist.train import train

    monkeypatch.setenv("METADIST_CACHE_DIR", str(tmp_path / "cache"))
    base = small_overrides(
        omniglot_dir,
        tmp_path,
        **{"algo.strategy": "auto", "train.steps": 2, "train.checkpoint_every": 2},
    )
    said = []
    s1 = train(config.load(None, base + ["run.name=one"]), log=said.append)
    assert any("measured now" in x for x in said)
    cached = list((tmp_path / "cache").glob("plan-*.json"))
    assert len(cached) == 1
    rec = json.loads(cached[0].read_text())
    # exact mode, 8 tasks, at least 4 groups: groups of 1 or 2 are the candidates
    speeds = rec["tasks_per_s"]
    assert set(speeds) == {"1", "2"} and rec["at_once"] == int(max(speeds, key=speeds.get))
    assert s1["tasks_at_once"] == rec["at_once"] and s1["plan"]["tasks_per_s"] == speeds
    assert rec["key"]["threads"] == torch.get_num_threads() and rec["key"]["shape"]["ways"] == 5
    said = []
    s2 = train(config.load(None, base + ["run.name=two"]), log=said.append)
    assert s2["plan"] == s1["plan"] | {"why": s2["plan"]["why"]}
    assert any("cached in" in x for x in said) and not any("measured now" in x for x in said)
    a, b = (load_weights(tmp_path / "runs" / n / "model.safetensors")[0] for n in ("one", "two"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the cache now says the other size: a resumed run keeps its own, a new run takes the cache's
    other = 3 - rec["at_once"]
    cached[0].write_text(json.dumps(dict(rec, at_once=other)))
    resumed = train(config.load(None, base + ["run.name=one", "train.steps=4"]), log=print)
    assert resumed["tasks_at_once"] == s1["tasks_at_once"]
    assert train(config.load(None, base + ["run.name=three"]), log=print)["tasks_at_once"] == other
    # another shape is another key
    said = []
    train(
        config.load(
            None, base + ["run.name=four", "data.queries=2", f"data.shards={tmp_path / 'shards2'}"]
        ),
        log=said.append,
    )
    assert (
        any("measured now" in x for x in said)
        and len(list((tmp_path / "cache").glob("plan-*.json"))) == 2
    )


def test_concurrent_runs_measure_once_and_agree(omniglot_dir, tmp_path):
    """Two launches at once on an empty cache: one measures, the other waits on the lock and reads
    it."""
    import os
    import subprocess
    import sys

    from metadist.data.prepare import prepare

    base = small_overrides(omniglot_dir, tmp_path, **{"algo.strategy": "auto", "train.steps": 1})
    prepare(config.load(None, base).data, log=lambda *a: None)
    env = dict(os.environ, METADIST_CACHE_DIR=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "metadist", "train", *base, f"run.name=c{i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sum("measured now" in o[0] for o in outs) == 1
    chosen = {
        json.loads((tmp_path / "runs" / f"c{i}" / "summary.json").read_text())["tasks_at_once"]
        for i in range(2)
    }
    assert len(chosen) == 1


def test_maml_plus_plus_settings_train_save_and_evaluate(omniglot_dir, tmp_path):
    args = small_overrides(
        omniglot_dir,
        tmp_path,
        **{
            "algo.learn_inner_lr": "layer_step",
            "algo.multi_step_loss": 2,
            "algo.per_step_bn": "true",
            "algo.inner_steps": 2,
            "train.steps": 3,
        },
    )
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    model, _cfg = load_model(tmp_path / "runs" / "t")
    assert model.get_parameter("inner_lr.head_weight").shape == (2, 1, 1)
    assert model.get_parameter("blocks.0.norm.weight").shape == (2, 8)
    assert not any(k.startswith("inner_lr.blocks_0_norm") for k, _ in model.named_parameters())
    # more steps than trained
    r = run_cli("evaluate", "--run", tmp_path / "runs" / "t", "eval.inner_steps=5")
    assert r.returncode == 0, r.stderr[-2000:]


def test_device_resident_data_trains_the_same_weights(omniglot_dir, tmp_path):
    from metadist.train import train

    base = small_overrides(omniglot_dir, tmp_path, **{"train.steps": 14, "data.task_aug": 0.5})
    for mode in ("off", "on"):
        train(
            config.load(None, base + [f"data.device_cache={mode}", f"run.name={mode}"]),
            log=lambda *a: None,
        )
    a, b = (load_weights(tmp_path / "runs" / m / "model.safetensors")[0] for m in ("off", "on"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_then_maml_from_its_backbone(omniglot_dir, tmp_path):
    """The two documented commands: a classifier over every train class (its head as wide as the
    train split has classes), whose backbone.safetensors (no head, no rates) starts a MAML run."""
    from metadist.data.store import read_manifest

    base = small_overrides(
        omniglot_dir, tmp_path, **{"train.steps": 3, "algo.learn_inner_lr": "layer"}
    )
    r = run_cli("train", *base, "algo.name=pretrain", "run.name=pre")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "pre"
    weights, _ = load_weights(run / "model.safetensors")
    classes = len(read_manifest(tmp_path / "shards", "train")["classes"])
    assert weights["head.weight"].shape[0] == classes
    body, _ = load_weights(run / "backbone.safetensors")
    assert not any(k.startswith("head.") or k.startswith("inner_lr.") for k in body)
    assert set(body) == {k for k in weights if not k.startswith(("head.", "inner_lr."))}
    r = run_cli("evaluate", "--run", run)  # a new head per task, from the prototypes
    assert r.returncode == 0 and '"episodes": 24' in r.stdout, r.stderr[-2000:]
    r = run_cli(
        "train",
        *base,
        f"model.init={run / 'backbone.safetensors'}",
        "run.name=maml",
        "train.steps=1",
        "train.meta_lr=1e-12",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "started from its tensors; at their initialisation: head.bias, head.weight, inner_lr."
        in r.stdout
    )
    after, _ = load_weights(tmp_path / "runs" / "maml" / "model.safetensors")
    # the body started there
    assert all(torch.allclose(after[k], body[k], atol=1e-6) for k in body)
    r = run_cli(
        "train", *base, f"model.init={run / 'model.safetensors'}", "run.name=wide", "train.steps=1"
    )
    assert (
        r.returncode == 2
        and f"head.weight ({classes}, 8) (the model's (5, 8))" in r.stderr.strip().splitlines()[-1]
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo.name=protonet"],
        ["algo.head_init=shared"],
        ["algo.head_init=proto"],
        ["algo.head_init=zero", "algo.name=anil"],
        ["algo.name=protonet", "data.train_ways=8", "data.train_queries=3"],
        ["algo.head_init=proto", "data.train_ways=7"],
    ],
)
def test_protonet_and_head_inits_train_evaluate_and_predict(omniglot_dir, tmp_path, overrides):
    args = small_overrides(omniglot_dir, tmp_path, **{"train.steps": 2})
    r = run_cli("train", *args, *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    r = run_cli("export-tasks", *args, *overrides, "--out", tmp_path / "tasks", "--limit", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("predict", "--run", run, "--tasks", tmp_path / "tasks", "--out", tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = (tmp_path / "p.csv").read_text().splitlines()[1:]
    assert len(rows) == 8 * 5
    # the predictions are the evaluation's: query image j of every task is class j
    hits = sum(int(row.split(",")[1]) == i % 5 for i, row in enumerate(rows)) / len(rows)
    r = run_cli("evaluate", "--run", run, "eval.test_episodes=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert abs(json.loads(r.stdout.strip().splitlines()[-1])["accuracy"] - hits) < 1e-6


def test_budget_schedule_fixes_one_step_count_per_machine_and_shape(
    omniglot_dir, tmp_path, monkeypatch
):
    """train.budget_schedule: the count is fixed at the probe, then again at the refit from the
    steady rate, both from (cached) timings; the same command twice gives that count and the same
    weights; the learning rate holds until the probe and anneals to 0 at the count; a resume
    keeps the count."""
    from metadist.train import train

    monkeypatch.setenv("METADIST_CACHE_DIR", str(tmp_path / "cache"))
    base = small_overrides(
        omniglot_dir,
        tmp_path,
        **{
            "train.steps": 60,
            "train.max_minutes": 0.5,
            "train.budget_schedule": "true",
            "train.budget_probe": 6,
            "train.schedule": "cosine",
            "train.val_every": 5,
            "train.checkpoint_every": 5,
            "train.keep_checkpoints": 100,
        },
    )
    train(config.load(None, base + ["run.name=first", "train.steps=8"]), log=lambda *a: None)
    # the probe's record (budget-steady-*.json is the refit's)
    (rec_file,) = [p for p in (tmp_path / "cache").glob("budget-*.json") if "steady" not in p.name]
    rec = json.loads(rec_file.read_text())
    assert rec["step_s"] > 0 and rec["val_s"] > 0 and rec["ckpt_s"] > 0
    # the timed checkpoint was written aside and removed: only the run's own remain
    ckpts = tmp_path / "runs" / "first" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000005", "step_000008"]
    # pretend this machine is slow, so that fewer steps than train.steps fit the budget; each
    # validation also writes the best weights (counted as a checkpoint), and so does every 5th step
    rec_file.write_text(json.dumps(dict(rec, step_s=1.0, val_s=2.0, ckpt_s=0.5)))
    # at the probe (step 6): the most steps n whose time fits 0.985 of 30 s: n steps of 1 s, a
    # validation (2 s) with its best weights (0.5 s) and a checkpoint (0.5 s) every 5 steps, and
    # both again at the last step unless it is a fifth: 17 steps take 17 + 3 * 3 + 3 = 29 s
    first = 17
    # then steadier at 1.2 s/step from the probe to the refit, at step max(7, 17 / 4)
    (steady_file,) = (tmp_path / "cache").glob("budget-steady-*.json")
    steady = json.loads(steady_file.read_text())
    assert steady["key"]["shape"]["probe"] == 6 and steady["key"]["shape"]["refit"] == 7
    steady_file.write_text(json.dumps(dict(steady, steady_step_s=1.2)))
    # at step 7: 6 + 1.2 + 3 (step 5's validation and checkpoint) = 10.2 s; 15 steps: 10.2 +
    # 8 * 1.2 + 2 * 3 = 25.8 s; 16 steps: 30 s, over
    want = 15
    said = []
    a = train(config.load(None, base + ["run.name=a"]), log=said.append)
    assert any(f"the schedule ends at step {first}" in x for x in said)
    line = f"to step 7 (cached in {steady_file}): the schedule ends at step {want}"
    assert any(line in x for x in said), said
    b = train(config.load(None, base + ["run.name=b"]), log=lambda *x: None)
    assert a["steps"] == b["steps"] == want
    wa, wb = (load_weights(tmp_path / "runs" / n / "model.safetensors")[0] for n in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lrs = [
        json.loads(x)["lr"]
        for x in (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()
        if '"lr"' in x
    ]
    assert lrs[:6] == [lrs[0]] * 6 and lrs[-1] == 0.0 and lrs[10] < lrs[0]
    recorded = json.loads((tmp_path / "runs" / "a" / "schedule.json").read_text())
    assert recorded["steps"] == want and recorded["probe"]["fits"] == first
    # resumed from step 10 (after the probe): the count comes from the checkpoint, not the cache
    import shutil

    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "d")
    for p in (tmp_path / "runs" / "d" / "checkpoints").iterdir():
        if int(p.name[5:]) > 10:
            shutil.rmtree(p)
    # a count of 2, were it asked
    rec_file.write_text(json.dumps(dict(rec, step_s=10.0, val_s=2.0, ckpt_s=0.5)))
    said = []
    d = train(config.load(None, base + ["run.name=d"]), log=said.append)
    assert any("from step_000010" in x for x in said) and not any(
        "schedule ends" in x for x in said
    )
    wd = load_weights(tmp_path / "runs" / "d" / "model.safetensors")[0]
    assert d["steps"] == want and all(torch.equal(wa[k], wd[k]) for k in wa)


def test_exact_mode_records_its_groups_and_the_world_sizes_it_supports(
    omniglot_dir, tmp_path, monkeypatch
):
    """train.reduce=exact records its plan (fixed groups of tasks, the world sizes with the same
    weights, why) in strategy.json, summary.json and the checkpoint, and says it at start; a
    launch whose processes cannot split the groups is refused in one line naming the sizes."""
    from metadist.step import Plan
    from metadist.train import train

    monkeypatch.setenv("METADIST_CACHE_DIR", str(tmp_path / "cache"))
    base = small_overrides(
        omniglot_dir, tmp_path, **{"train.steps": 2, "algo.strategy": "batched"}
    ) + ["train.meta_batch_size=8"]
    said = []
    train(config.load(None, base + ["run.name=group"]), log=said.append)
    rec = json.loads((tmp_path / "runs" / "group" / "strategy.json").read_text())
    summary = json.loads((tmp_path / "runs" / "group" / "summary.json").read_text())
    meta = json.loads(
        (tmp_path / "runs" / "group" / "checkpoints" / "step_000002" / "meta.json").read_text()
    )
    # 8 tasks, at least train.exact_processes=4 groups: groups of 2, the same at 1, 2 and 4
    assert rec["at_once"] == 2 and rec["worlds"] == [1, 2, 4] and rec["reduce"] == "exact"
    assert summary["plan"] == rec == meta["plan"]
    assert any("exact: 4 fixed groups of 2 task(s), the same weights at 1, 2, 4" in x for x in said)
    with pytest.raises(config.ConfigError, match=r"launch 1, 2, 4 processes"):
        Plan.of_record(rec).check_world(8, 8)
    train(config.load(None, base + ["run.name=one", "algo.tasks_per_chunk=1"]), log=said.append)
    rec = json.loads((tmp_path / "runs" / "one" / "strategy.json").read_text())
    assert rec["at_once"] == 1 and rec["worlds"] == [1, 2, 4, 8]
    assert "algo.tasks_per_chunk=1" in rec["why"]


def test_train_ways_and_queries_shape_the_train_split_only(omniglot_dir, tmp_path, monkeypatch):
    """data.train_ways/train_queries: the train split's episodes are drawn at that shape (its
    manifest and the batches trained on), val and test keep data.ways/queries, and the shards go
    to a folder of their own; a learned head (its rows are the test's ways) is refused in one
    line."""
    from metadist.data.prepare import prepare, shards_dir
    from metadist.data.split import EpisodeSource

    monkeypatch.chdir(tmp_path)  # data/shards/<named by the data> lands here
    plain = config.load(None, small_overrides(omniglot_dir, tmp_path, **{"data.shards": ""}))
    cfg = config.load(
        None,
        small_overrides(
            omniglot_dir,
            tmp_path,
            **{
                "data.shards": "",
                "data.train_ways": 8,
                "data.train_queries": 3,
                "algo.name": "protonet",
            },
        ),
    )
    assert shards_dir(cfg.data) != shards_dir(plain.data)
    assert "-train8w3q-" in str(shards_dir(cfg.data))
    prepare(cfg.data, log=lambda *a: None)
    root = shards_dir(cfg.data)
    shapes = {s: EpisodeSource(root, s) for s in ("train", "val", "test")}
    assert (shapes["train"].ways, shapes["train"].shots, shapes["train"].queries) == (8, 1, 3)
    for s in ("val", "test"):
        assert (shapes[s].ways, shapes[s].shots, shapes[s].queries) == (5, 1, 1)
    x = shapes["train"].all(2)
    assert x.shape[:2] == (2, 8 * (1 + 3))

    r = run_cli("train", *small_overrides(omniglot_dir, tmp_path), "data.train_ways=8")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "data.train_ways" in last and "algo.name=protonet" in last


def test_a_fitted_schedule_ends_the_run_and_the_time_bound_waits_a_quarter_more():
    """train.budget_schedule: the fitted count ends the run; train.max_minutes stops it only at
    1.25 x the budget (a machine slower than its cached timings still ends its schedule, with the
    same weights), and says so where the schedule overran; without a fitted schedule,
    max_minutes is the bound."""
    from metadist.config import TrainConfig
    from metadist.schedule import overran, time_limit

    assert time_limit(TrainConfig()) == math.inf
    assert time_limit(TrainConfig(max_minutes=0.5)) == 30.0
    fitted = TrainConfig(max_minutes=0.5, budget_schedule=True)
    assert time_limit(fitted) == 37.5
    assert overran(fitted, 29.0) is None and overran(TrainConfig(max_minutes=0.5), 40.0) is None
    line = overran(fitted, 33.0)
    assert "took 0.6 min of a 0.5-min budget" in line and "past 0.625 min" in line
