"""`metadist sweep` and `metadist tune` through the command line, on the synthetic Omniglot: a
sweep's table is its members' summaries (mean, std and the interval across seeds computed here
from them), a killed sweep resumes without rerunning a finished member; a real Optuna study in
SQLite prunes a trailing trial, reads no test split, resumes a killed search (the interrupted
trial retried in its own run folder, from its checkpoint) and writes its best trial as a config
that loads; bad files and a missing Optuna are one line."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metadist import config
from metadist.sweep import t95
from tests.conftest import ROOT, run_cli, small_overrides


def base(tmp: Path, omniglot_dir: Path, **extra) -> tuple[Path, list[str]]:
    cfg = tmp / "base.yaml"
    cfg.write_text("algo:\n  name: protonet\n")
    over = small_overrides(omniglot_dir, tmp, **extra)
    return cfg, [o for o in over if not o.startswith("run.name=")]


def popen(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "metadist", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, what: str, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def checkpointed(run: Path) -> bool:
    return any((run / "checkpoints").glob("step_*"))


def test_a_killed_sweep_resumes_and_its_table_is_its_members_summaries(tmp_path, omniglot_dir):
    cfg, over = base(tmp_path, omniglot_dir, **{"train.steps": 30, "train.checkpoint_every": 2})
    sweep = tmp_path / "seeds.yaml"
    grid = {"train.meta_lr": [0.001, 0.003]}
    spec = {"config": str(cfg), "overrides": over, "seeds": [0, 1], "grid": grid, "parallel": 1}
    sweep.write_text(yaml.safe_dump(spec))
    root = tmp_path / "runs" / "seeds"
    first, second = root / "train.meta_lr=0.001_seed0", root / "train.meta_lr=0.001_seed1"
    p = popen("sweep", sweep)
    wait_for(lambda: checkpointed(second), "the second member's first checkpoint")
    p.send_signal(signal.SIGKILL)  # the sweep dies; its running member checkpoints and stops
    p.wait()
    done = (first / "summary.json").stat().st_mtime_ns
    assert not (second / "summary.json").exists()
    r = run_cli("sweep", sweep)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "4 members, 1 finished, 3 to run" in r.stdout
    assert (first / "summary.json").stat().st_mtime_ns == done  # never rerun
    assert "resuming" in (root / "train.meta_lr=0.001_seed1.log").read_text()
    table = json.loads((root / "sweep.json").read_text())
    assert len(table["members"]) == 4
    for row in table["members"]:
        s = json.loads((root / row["member"] / "summary.json").read_text())
        assert row["test_accuracy"] == s["test_accuracy"] and row["steps"] == s["steps"] == 30
        assert row["tasks_seen"] == s["tasks_seen"] == 30 * 8
        assert config.load(root / row["member"] / "config.yaml").seed == row["seed"]
    for g, lr in zip(table["groups"], grid["train.meta_lr"]):
        accs = [r["test_accuracy"] for r in table["members"] if r["point"].endswith(f"={lr}")]
        assert g["n"] == 2 and g["mean"] == pytest.approx(statistics.mean(accs))
        assert g["std"] == pytest.approx(statistics.stdev(accs))
        assert g["ci95"] == pytest.approx(12.706 * statistics.stdev(accs) / 2**0.5)
    md = (root / "sweep.md").read_text()
    assert "| train.meta_lr=0.003 | 2 |" in md and (root / "sweep.csv").read_text().count("\n") == 5


def test_members_run_two_at_a_time_unless_they_have_a_time_budget(tmp_path, omniglot_dir):
    from metadist import sweep

    cfg, over = base(tmp_path, omniglot_dir)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"config": str(cfg), "overrides": over, "seeds": [0, 1, 2]}))
    assert sweep.read(f).parallel == (2 if (os.cpu_count() or 1) >= 2 else 1)
    assert sweep.read(f, ["train.max_minutes=5"]).parallel == 1
    assert sweep.read(f, parallel=3).parallel == 3
    s = sweep.read(f, seeds=[4])
    assert s.parallel == 1 and [m.name for m in s.members()] == ["seed4"]
    assert "train.threads=1" in s.command(s.members()[0], threads=1)


def test_student_t_matches_its_table():
    # scipy.stats.t.ppf(0.975, df) for df beyond the table
    for df, t in ((10, 2.228), (15, 2.131), (29, 2.045), (60, 2.000), (1000, 1.962)):
        assert abs(t95(df) - t) < 4e-3


def test_bad_sweep_and_tune_files_are_one_line(tmp_path, omniglot_dir):
    cfg, _ = base(tmp_path, omniglot_dir)
    cases = {
        "nothing.yaml": None,
        "noconfig.yaml": {"seeds": [0]},
        "key.yaml": {"config": str(cfg), "seed": [0]},
        "member.yaml": {"config": str(cfg), "grid": {"train.meta_lr": ["fast"]}},
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_text(yaml.safe_dump(content))
        r = run_cli("sweep", tmp_path / name)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "unknown key 'seed'" in run_cli("sweep", tmp_path / "key.yaml").stderr
    assert "member train.meta_lr=fast_seed0: train.meta_lr: expected float" in (
        run_cli("sweep", tmp_path / "member.yaml").stderr
    )
    bad = tmp_path / "space.yaml"
    bad.write_text(yaml.safe_dump({"config": str(cfg), "space": {"train.meta_lr": {"low": 1}}}))
    r = run_cli("tune", bad)
    assert r.returncode == 2 and "space train.meta_lr: expected {low" in r.stderr
    space = {"train.meta_lr": {"choices": [0.001]}}
    bad.write_text(yaml.safe_dump({"config": str(cfg), "space": space, "pruner": {"by": "tasks"}}))
    r = run_cli("tune", bad)
    assert r.returncode == 2 and "pruner by is step or time, not 'tasks'" in r.stderr


def test_the_time_pruner_compares_curves_at_equal_training_time():
    """pruner `by: time`: a trial's best validation so far against the median of the others' best
    by the same training time (reports keyed by milliseconds), after its warm-up validations and
    the startup trials; a trial of slower steps is not pruned for trailing at equal steps."""
    optuna = pytest.importorskip("optuna")
    from metadist.tune import time_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(direction="maximize", pruner=time_pruner(startup=1, warmup=2))
    first = s.ask()
    for ms, v in ((1000, 0.5), (2000, 0.8), (3000, 0.9)):
        first.report(v, ms)
    s.tell(first, 0.9)
    slow = s.ask()  # its validations come later in time than the first's at the same steps
    slow.report(0.2, 500)
    assert not slow.should_prune()  # no other trial had validated by 500 ms; and its warm-up
    slow.report(0.6, 1500)
    assert not slow.should_prune()  # 0.6 against the first's 0.5 by 1500 ms
    slow.report(0.7, 2500)
    assert slow.should_prune()  # 0.7 against the first's 0.8 by 2500 ms
    early = s.ask()
    early.report(0.4, 900)
    early.report(0.45, 950)
    assert not early.should_prune()  # nobody had validated by 950 ms


def test_tune_without_optuna_says_what_to_install(tmp_path, omniglot_dir):
    cfg, over = base(tmp_path, omniglot_dir)
    tune = tmp_path / "t.yaml"
    space = {"train.meta_lr": {"choices": [0.001]}}
    tune.write_text(yaml.safe_dump({"config": str(cfg), "overrides": over, "space": space}))
    hide = tmp_path / "hide"
    (hide / "optuna").mkdir(parents=True)
    (hide / "optuna" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = dict(os.environ, PYTHONPATH=f"{hide}:{ROOT}")
    r = run_cli("tune", tune, env=env)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "metadist tune: error: metadist tune needs Optuna: pip install 'metadist[tune]' (optuna)"
    )


def test_tune_prunes_a_trailing_trial_resumes_a_killed_search_and_writes_the_best(
    tmp_path, omniglot_dir
):
    optuna = pytest.importorskip("optuna")  # make install installs it
    cfg, over = base(
        tmp_path,
        omniglot_dir,
        **{"train.steps": 40, "train.val_every": 4, "train.checkpoint_every": 2},
    )
    tune = tmp_path / "search.yaml"
    tune.write_text(
        yaml.safe_dump(
            {
                "config": str(cfg),
                "overrides": over,
                "trials": 3,
                "space": {"train.meta_lr": {"low": 1e-9, "high": 1e-2, "log": True}},
                # a learning trial; one that cannot learn (pruned: it trails the first); the
                # first again (the same curve, bit for bit, through its kill and resume: never
                # worse than the median, so not pruned)
                "enqueue": [
                    {"train.meta_lr": 0.003},
                    {"train.meta_lr": 1e-9},
                    {"train.meta_lr": 0.003},
                ],
                "pruner": {"startup_trials": 1, "warmup_validations": 1},
            }
        )
    )
    root = tmp_path / "runs" / "search"
    p = popen("tune", tune)
    wait_for(lambda: checkpointed(root / "trials" / "trial0002"), "trial 2's first checkpoint")
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_cli("tune", tune)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 of 3 trials done, 1 interrupted trial(s) to retry" in r.stdout
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{root / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    retry = study.trials[3]
    assert retry.user_attrs["run"] == "trial0002" and retry.params == {"train.meta_lr": 0.003}
    assert "resuming" in (root / "trials" / "trial0002.log").read_text()
    pruned = study.trials[1]
    assert max(pruned.intermediate_values) < 40  # stopped before its end
    summaries = [
        json.loads((root / "trials" / run / "summary.json").read_text())
        for run in ("trial0000", "trial0002")
    ]
    for s in summaries:  # the search read no test split
        assert "test_accuracy" not in s and s["steps"] == 40
    assert retry.value == study.trials[0].value == summaries[0]["best_val_accuracy"]
    best = study.best_trial
    assert f"best trial {best.number}: val {best.value:.4f}" in r.stdout
    cfg_best = config.load(root / "best.yaml")
    assert cfg_best.train.meta_lr == best.params["train.meta_lr"]
    assert cfg_best.algo.name == "protonet" and cfg_best.train.steps == 40


def test_a_search_stopped_by_sigterm_retries_the_stopped_trial_from_its_checkpoint(
    tmp_path, omniglot_dir
):
    """SIGTERM to `metadist tune` (Ctrl-C, a job's end): the running trial checkpoints, the search
    exits 75 in one line (no traceback), and the next launch runs that trial's values again in its
    run folder, resumed from its checkpoint."""
    optuna = pytest.importorskip("optuna")
    cfg, over = base(tmp_path, omniglot_dir, **{"train.steps": 16, "train.checkpoint_every": 2})
    tune = tmp_path / "stop.yaml"
    space = {"train.meta_lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    spec = {"config": str(cfg), "overrides": over, "trials": 1, "space": space}
    tune.write_text(yaml.safe_dump(dict(spec, enqueue=[{"train.meta_lr": 0.003}])))
    root = tmp_path / "runs" / "stop"
    p = popen("tune", tune)
    wait_for(lambda: checkpointed(root / "trials" / "trial0000"), "trial 0's first checkpoint")
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 75, out
    assert "Traceback" not in out and out.strip().splitlines()[-1].endswith(
        "stopped by a signal; launch it again to go on"
    )
    r = run_cli("tune", tune)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    study = optuna.load_study(study_name="stop", storage=f"sqlite:///{root / 'study.db'}")
    stopped, again = study.trials
    assert again.user_attrs["run"] == "trial0000" and again.params == {"train.meta_lr": 0.003}
    assert again.user_attrs["retry_of"] == stopped.number
    assert "resuming" in (root / "trials" / "trial0000.log").read_text()
