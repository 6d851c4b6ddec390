"""Command line: `metadist {prepare,train,evaluate,predict,plot,export-tasks,show} [--config FILE] [key=value ...]`
(also `python -m metadist ...` and `accelerate launch -m metadist train ...`).

Config keys are set only as `section.key=value` arguments (see metadist/config.py); the flags
here name files and folders. Errors from bad input print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metadist import config as config_mod


def _cfg(args) -> config_mod.Config:
    overrides = list(args.overrides)
    if getattr(args, "debug", False):
        overrides = ["train.debug=true", *overrides]
    return config_mod.load(args.config, overrides)


def cmd_prepare(args):
    from metadist.data.prepare import prepare
    prepare(_cfg(args))


def cmd_train(args):
    cfg = _cfg(args)
    if cfg.train.debug:
        cfg = apply_debug(cfg)
    from metadist.train import train
    train(cfg)


def apply_debug(cfg: config_mod.Config) -> config_mod.Config:
    """Debug mode: a few steps on a small subset, single device; explicit keys still win."""
    d = cfg.to_dict()
    small = {"train.steps": 5, "train.val_every": 5, "train.log_every": 1, "train.checkpoint_every": 5,
             "data.val_episodes": 16, "eval.test_episodes": 32, "tracking.mode": "disabled"}
    default = config_mod.Config().to_dict()
    for key, value in small.items():
        sec, k = key.split(".")
        if d[sec][k] == default[sec][k]:
            d[sec][k] = value
    if not d["run"]["name"].endswith("-debug"):
        d["run"]["name"] += "-debug"
    return config_mod.from_dict(d)


def _model(args):
    import torch
    from metadist.evaluate import load_model
    model, cfg = load_model(args.run)
    cfg = config_mod.override(cfg, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), cfg, device


def cmd_evaluate(args):
    from metadist.data.prepare import shards_dir
    from metadist.data.shards import EpisodeSource
    from metadist.evaluate import ci95, episode_accuracies
    model, cfg, device = _model(args)
    split = EpisodeSource(Path(args.shards or shards_dir(cfg)) / args.split)
    m = split.manifest
    if (m["ways"], m["shots"], m["queries"]) != (cfg.data.ways, cfg.data.shots, cfg.data.queries):
        cfg.data.shots, cfg.data.queries = m["shots"], m["queries"]
        if m["ways"] != model.ways:
            raise config_mod.ConfigError(f"{split.dir}: {m['ways']}-way episodes, the model's head has {model.ways} ways")
    episodes = split.all(cfg.eval.test_episodes if args.split == "test" else 0)
    accs = episode_accuracies(model, cfg, episodes, cfg.eval.inner_steps, device)
    mean, ci = ci95(accs.cpu().numpy())
    result = {"accuracy": mean, "ci95": ci, "episodes": len(episodes), "inner_steps": cfg.eval.inner_steps,
              "split": str(split.dir)}
    print(json.dumps(result))


def cmd_predict(args):
    from metadist.evaluate import predict
    model, cfg, device = _model(args)
    n = predict(model, cfg, Path(args.tasks), Path(args.out), device)
    print(f"wrote predictions for {n} tasks to {args.out}")


def cmd_plot(args):
    from metadist.plot import plot
    print(plot([Path(r) for r in args.runs], Path(args.out)))


def _split_source(args):
    from metadist.data.prepare import prepare, shards_dir
    from metadist.data.shards import EpisodeSource
    cfg = _cfg(args)
    root = shards_dir(cfg)
    if not (root / args.split / "manifest.json").is_file():
        prepare(cfg)
    return cfg, EpisodeSource(root / args.split)


def cmd_export_tasks(args):
    from metadist.data.export import export_tasks
    cfg, src = _split_source(args)
    n = export_tasks(src.all(args.limit), src.ways, src.shots, src.queries, Path(args.out))
    print(f"wrote {n} tasks of {src.dir} to {args.out}")


def cmd_show(args):
    from metadist.data.export import show
    cfg, src = _split_source(args)
    aug = cfg.data.task_aug if args.split == "train" else 0.0
    print(show(src.all(args.episodes), src.ways, src.shots, src.queries, Path(args.out), aug, cfg.seed))


def main(argv=None):
    p = argparse.ArgumentParser(prog="metadist", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help, config=True):
        s = sub.add_parser(name, help=help)
        if config:
            s.add_argument("--config", help="YAML file listing what differs from the defaults")
        s.set_defaults(fn=fn)
        return s

    add("prepare", cmd_prepare, "raw Omniglot -> train/val/test episode shards")
    s = add("train", cmd_train, "meta-train (resumes an existing run folder)")
    s.add_argument("--debug", action="store_true", help="single device, few steps, anomaly detection, strategy cross-check")
    for name, fn, help in (("evaluate", cmd_evaluate, "mean accuracy +- 95%% CI on fixed episodes"),
                           ("predict", cmd_predict, "predict query classes of a folder of tasks -> CSV")):
        s = add(name, fn, help, config=False)
        s.add_argument("--run", required=True, help="run folder or weights file")
        if name == "evaluate":
            s.add_argument("--split", default="test", choices=("train", "val", "test"))
            s.add_argument("--shards", help="shards folder (default: the one the run's config names)")
        else:
            s.add_argument("--tasks", required=True, help="folder with support/NNNN/ and query/NNNN/")
            s.add_argument("--out", default="output.csv")
    s = add("plot", cmd_plot, "learning curves of runs -> PNG", config=False)
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", default="curves.png")
    s = add("export-tasks", cmd_export_tasks, "write a split's episodes in the exercise's test layout")
    s.add_argument("--split", default="test", choices=("train", "val", "test"))
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=0, help="first N episodes (0 = all)")
    s = add("show", cmd_show, "PNG grid of a few episodes of a split")
    s.add_argument("--split", default="train", choices=("train", "val", "test"))
    s.add_argument("--episodes", type=int, default=8)
    s.add_argument("--out", default="episodes.png")

    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config values are given as section.key=value)")
    args.overrides = rest
    from metadist.data.omniglot import DataError
    from metadist.data.shards import ShardError
    from metadist.distributed import DistError
    from metadist.evaluate import EvalError
    from metadist.train import TrainError
    try:
        args.fn(args)
    except (config_mod.ConfigError, DataError, ShardError, DistError, EvalError, TrainError, ValueError) as e:
        print(f"metadist {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
