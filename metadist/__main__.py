"""Command line: `metadist {prepare,verify,train,evaluate,predict,export,demo,sweep,tune,plot,
export-tasks,show} [--config FILE] [key=value ...]` (also `python -m metadist ...` and
`accelerate launch -m metadist train ...`). The same from Python: metadist/api.py (`metadist.load`).

Config keys are set only as `section.key=value` arguments (see metadist/config.py); the flags
here name files and folders. Each command imports only what it uses. A user-facing error
(`metadist.errors.MetadistError`) prints one line and exits 2; a preempted run exits 75 and
resumes when launched again; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from metadist import config as config_mod
from metadist.errors import MetadistError


def _cfg(args) -> config_mod.Config:
    overrides = list(args.overrides)
    if getattr(args, "debug", False):
        overrides = ["train.debug=true", *overrides]
    return config_mod.load(args.config, overrides)


def cmd_verify(args):
    from metadist.data.format import verify
    from metadist.data.prepare import SPLITS, shards_dir
    from metadist.data.store import ShardError, read_manifest

    cfg = _cfg(args)
    root = args.shards or shards_dir(cfg.data)
    found = 0
    for split in SPLITS:
        try:
            m = read_manifest(root, split)
        except ShardError:
            continue
        verify(root, split, manifest=m, cache_dir=cfg.data.cache_dir)
        found += 1
        shape = "x".join(map(str, m["image_shape"]))
        print(
            f"{split}: {len(m['pool'])} pool + {len(m['shards'])} episode shards "
            f"({len(m['classes'])} classes, "
            f"{m['episodes']} episodes), {m['bytes'] / 1e6:.1f} MB: sizes and sha256 match "
            f"({m['dataset']}, "
            f"{m['ways']}-way {m['shots']}-shot {m['queries']}-query, {shape} images, data.seed "
            f"{m['seed']})"
        )
    if not found:
        raise ShardError(f"{root}: no split (train/, val/, test/ with a manifest.json) to verify")


def cmd_prepare(args):
    from metadist.data.prepare import prepare

    prepare(_cfg(args).data, overwrite=args.overwrite)


def cmd_train(args):
    cfg = _cfg(args)
    if cfg.train.debug:
        cfg = apply_debug(cfg, config_mod.explicit_keys(args.config, args.overrides))
    from metadist.train import train

    train(cfg)


DEBUG_SMALL = {
    "train.steps": 5,
    "train.val_every": 5,
    "train.log_every": 1,
    "train.checkpoint_every": 5,
    "data.val_episodes": 16,
    "eval.test_episodes": 32,
    "tracking.mode": "disabled",
}


def apply_debug(cfg: config_mod.Config, explicit: set[str]) -> config_mod.Config:
    """Debug mode: a few steps on a small subset, single device; keys the user set (in the YAML
    file or as key=value) keep their values."""
    d = cfg.to_dict()
    for key, value in DEBUG_SMALL.items():
        if key not in explicit:
            sec, k = key.split(".")
            d[sec][k] = value
    if not d["run"]["name"].endswith("-debug"):
        d["run"]["name"] += "-debug"
    return config_mod.from_dict(d)


def _model(args):
    """The run's model, its config with the command's overrides, its device (the API's load)."""
    from metadist.api import load

    learner = load(args.run, overrides=args.overrides)
    return learner.model, learner.cfg, learner.device


def cmd_evaluate(args):
    from metadist.algorithms import eval_inner
    from metadist.data.prepare import shards_dir
    from metadist.data.roots import Sources
    from metadist.data.store import Access
    from metadist.evaluate import format_table, test_report

    model, cfg, device = _model(args)
    access = Access.of(cfg.data)
    explicit = args.shards or any(o.startswith("data.shards=") for o in args.overrides)
    # the run's own sources (many: Meta-Dataset's table), or another shards folder (cross-domain)
    if explicit:
        sources = Sources.one(args.shards or shards_dir(cfg.data), access)
    else:
        sources = Sources.of(cfg.data)
    splits = {
        n: _eval_split(r, args.split, cfg, access) for n, r in zip(sources.names, sources.roots)
    }
    first = next(iter(splits.values()))
    inner = eval_inner(cfg.algo, cfg.eval, model, first.ways)
    limit = sources.test_limit(cfg.eval) if args.split == "test" else 0
    episodes = {n: s.all(limit) for n, s in splits.items()}
    r = test_report(model, episodes, sources.many, inner, cfg.eval.tasks_per_batch, device)
    if sources.many:
        print(format_table(r, f"{args.split} source"), file=sys.stderr)
    split = args.split if sources.many else str(first.dir)
    print(json.dumps(dict(r, inner_steps=inner.steps, split=split)))


def _eval_split(root, split: str, cfg, access):
    """A split of shards the run's model can be evaluated on: its image shape, and the ways of a
    learned head."""
    from metadist.algorithms import get
    from metadist.data.roots import image_shape_problem
    from metadist.data.split import EpisodeSource

    src = EpisodeSource(root, split, access=access)
    m = src.manifest
    want = [cfg.data.channels, cfg.data.image_size, cfg.data.image_size]
    if problem := image_shape_problem(str(src.dir), m["image_shape"], want):
        raise config_mod.ConfigError(problem)
    if get(cfg.algo).head_init(cfg.algo) == "learned" and (
        src.variable or m["ways"] != cfg.data.ways
    ):
        ways = "variable" if src.variable else f"{m['ways']}-way"
        raise config_mod.ConfigError(
            f"{src.dir}: {ways} episodes, the model's learned head has {cfg.data.ways} ways"
        )
    return src


def cmd_predict(args):
    from metadist.api import load, predict_folder

    learner = load(args.run, overrides=args.overrides)
    n = predict_folder(learner, Path(args.tasks), Path(args.out))
    print(f"wrote predictions for {n} tasks to {args.out}")


def cmd_export(args):
    from metadist.api import load, support_folder

    learner = load(args.run, overrides=args.overrides)
    if args.embedding:
        out = learner.export_embedding(args.out)
        shape = ", ".join(map(str, learner.image_shape))
        print(
            f"wrote the embedding network (n, {shape}) -> (n, {learner.model.feature_dim}) to {out}"
        )
        return
    if not args.task:
        raise config_mod.ConfigError("metadist export: give --task SUPPORT_DIR, or --embedding")
    images, labels, classes = support_folder(Path(args.task))
    out = learner.adapt(images, labels).export(args.out)
    print(f"wrote the classifier of {len(classes)} classes ({', '.join(classes)}) to {out}")


def cmd_demo(args):
    from metadist.demo import serve
    from metadist.learners import names

    runs = args.run or names()
    if not runs:
        raise config_mod.ConfigError("metadist demo: give --run RUN (no shipped learner found)")
    serve(runs, args.host, args.port, args.overrides)


def cmd_sweep(args):
    from metadist import sweep

    s = sweep.read(args.file, args.overrides, args.seeds, args.parallel)
    if args.table:
        n = len(s.members())
        print(f"sweep {s.name}: {n} members (--member 0..{n - 1}; SLURM: --array=0-{n - 1})")
        table = sweep.write_table(s)
    else:
        try:
            table = sweep.run(s, args.member)
        except sweep.Stop as e:
            from metadist.errors import Preempted

            raise Preempted(str(e)) from None
    print(sweep.markdown(table), end="")
    print(f"wrote {s.dir / 'sweep.md'}, sweep.csv and sweep.json")


def cmd_tune(args):
    from metadist import tune

    t = tune.read(args.file, args.overrides, args.trials, args.storage)
    best = tune.search(t)
    if best["best"] is None:
        print(f"tune {t.name}: no finished trial yet ({best['trials']} in the study)")
    else:
        shown = " ".join(f"{k}={v}" for k, v in best["params"].items())
        print(f"best trial {best['best']}: val {best['value']:.4f} ({shown}) -> {best['config']}")


def cmd_plot(args):
    from metadist.plot import plot

    print(plot([Path(r) for r in args.runs], Path(args.out)))


def _split_source(args):
    from metadist.data.prepare import ensure
    from metadist.data.split import EpisodeSource
    from metadist.data.store import Access

    cfg = _cfg(args)
    src = EpisodeSource(ensure(cfg.data), args.split, access=Access.of(cfg.data))
    if src.variable:
        raise config_mod.ConfigError(
            f"{src.dir}: variable episodes (data.episode=variable); `{args.command}` writes fixed "
            "ones (ways x shots): point it at shards of fixed episodes"
        )
    return cfg, src


def cmd_export_tasks(args):
    from metadist.data.prepare import preprocessing
    from metadist.data.task_files import export_tasks

    cfg, src = _split_source(args)
    n = export_tasks(
        src.all(args.limit),
        src.ways,
        src.shots,
        src.queries,
        Path(args.out),
        preprocessing(cfg.data)["invert"],
    )
    print(f"wrote {n} tasks of {src.dir} to {args.out}")


def cmd_show(args):
    from metadist.data.task_files import show

    cfg, src = _split_source(args)
    aug = cfg.data.task_aug if args.split == "train" else 0.0
    print(
        show(
            src.all(args.episodes), src.ways, src.shots, src.queries, Path(args.out), aug, cfg.seed
        )
    )


def parser() -> argparse.ArgumentParser:
    """Every command and its flags (config values come after them, as section.key=value)."""
    p = argparse.ArgumentParser(prog="metadist", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help, config=True):
        s = sub.add_parser(name, help=help)
        if config:
            s.add_argument("--config", help="YAML file listing what differs from the defaults")
        s.set_defaults(fn=fn)
        return s

    _data_commands(add)
    _model_commands(add)
    return p


def _data_commands(add) -> None:
    """prepare, verify, export-tasks, show."""
    s = add(
        "prepare",
        cmd_prepare,
        "raw images (Omniglot or your class folders) -> train/val/test episode shards",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace splits of another spec in the shards folder (only if no run reads them)",
    )
    s = add("verify", cmd_verify, "check every shard's size and sha256 against its manifest")
    s.add_argument(
        "--shards", help="shards folder or URL prefix (default: the one the config names)"
    )
    s = add(
        "export-tasks", cmd_export_tasks, "write a split's episodes in the exercise's test layout"
    )
    s.add_argument("--split", default="test", choices=("train", "val", "test"))
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=0, help="first N episodes (0 = all)")
    s = add("show", cmd_show, "PNG grid of a few episodes of a split")
    s.add_argument("--split", default="train", choices=("train", "val", "test"))
    s.add_argument("--episodes", type=int, default=8)
    s.add_argument("--out", default="episodes.png")


def _model_commands(add) -> None:
    """train, evaluate, predict, export."""
    s = add("train", cmd_train, "meta-train (resumes an existing run folder)")
    s.add_argument(
        "--debug",
        action="store_true",
        help="single device, few steps, anomaly detection, tasks-at-once cross-check",
    )
    for name, fn, help in (
        ("evaluate", cmd_evaluate, "mean accuracy +- 95%% CI on fixed episodes"),
        ("predict", cmd_predict, "predict query classes of a folder of tasks -> CSV"),
    ):
        s = add(name, fn, help, config=False)
        s.add_argument("--run", required=True, help="run folder or weights file")
        if name == "evaluate":
            s.add_argument("--split", default="test", choices=("train", "val", "test"))
            s.add_argument(
                "--shards",
                help="shards folder or URL prefix (default: the one the run's config names)",
            )
        else:
            s.add_argument(
                "--tasks", required=True, help="folder with support/NNNN/ and query/NNNN/"
            )
            s.add_argument("--out", default="output.csv")
    s = add(
        "export",
        cmd_export,
        "one adapted task's classifier -> ONNX (.onnx) or torch.export (.pt2)",
        config=False,
    )
    s.add_argument("--run", required=True, help="run folder or weights file")
    s.add_argument(
        "--task",
        help="the task's support: a folder with a subfolder of images per class (classes in "
        "name order), or the exercise's support/NNNN/ (image_i.png is class i)",
    )
    s.add_argument("--out", required=True, help="file.onnx or file.pt2")
    s.add_argument(
        "--embedding", action="store_true", help="the embedding network alone (no --task)"
    )
    _run_commands(add)


def _run_commands(add) -> None:
    """demo, sweep, tune, plot."""
    s = add(
        "demo",
        cmd_demo,
        "a local web page to teach a learner a task and watch it predict",
        config=False,
    )
    s.add_argument(
        "--run",
        action="append",
        help="run folder, weights file or shipped learner (repeat for several; default: the "
        "shipped learners)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765)
    s = add(
        "sweep",
        cmd_sweep,
        "a config over seeds and a grid of overrides -> one table",
        config=False,
    )
    s.add_argument("file", help="sweep file (YAML: config, overrides, seeds, grid, parallel)")
    s.add_argument("--seeds", type=int, nargs="+", help="the seeds (default: the file's)")
    s.add_argument("--parallel", type=int, help="members at once on this node (default 1)")
    s.add_argument("--member", type=int, help="run member i alone (a SLURM array's task)")
    s.add_argument("--table", action="store_true", help="only write the table of finished members")
    s = add("tune", cmd_tune, "an Optuna search, each trial a training run", config=False)
    s.add_argument("file", help="tune file (YAML: config, overrides, trials, space, ...)")
    s.add_argument("--trials", type=int, help="trials in the study (default: the file's)")
    s.add_argument("--storage", help="Optuna database URL (default: SQLite in the run root)")
    s = add("plot", cmd_plot, "learning curves of runs -> PNG", config=False)
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", default="curves.png")


def main(argv=None):
    p = parser()
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad:
        p.error(
            f"unrecognized arguments: {' '.join(bad)} (config values are given as "
            "section.key=value)"
        )
    args.overrides = rest
    try:
        args.fn(args)
    except MetadistError as e:
        say_error(f"metadist {args.command}: {'stopped' if e.exit_code != 2 else 'error'}: {e}")
        end(e.exit_code)
    end(0)


def say_error(line: str) -> None:
    """The one line, in one write to stderr: the ranks of a launch share it, and a line written
    in pieces can interleave with another rank's (seen: two ranks' lines joined into one)."""
    sys.stderr.flush()
    data = (line + "\n").encode(errors="backslashreplace")
    try:
        while data:  # a line under the pipe's atomic size goes in one piece
            data = data[os.write(sys.stderr.fileno(), data) :]
    except (OSError, ValueError):  # no real stderr (a captured one): the stream then
        print(line, file=sys.stderr)


def end(code: int) -> None:
    """Exit with `code`; a launched rank that ran collectives skips the interpreter shutdown
    (metadist.distributed.leave says why). Commands that form no group never import it."""
    dist = sys.modules.get("metadist.distributed")
    if dist is not None and dist.collectives_ran():
        dist.leave(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
