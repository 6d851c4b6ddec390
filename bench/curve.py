"""Accuracy of every checkpoint of one or more runs: the test (and val) accuracy a run had reached
after each checkpointed step, with its training wall time. This is how "accuracy within N minutes"
is read off a longer run, and how recipes are compared at equal tasks seen.

  python bench/curve.py runs/boss [runs/strong ...] [--splits val,test] [--steps 10] [--shards
  DIR|URL] [--out curve.jsonl]

Each checkpoint's weights carry their config, so the episodes are the run's own shards (or those
at --shards: a folder or URL prefix; only the shards are needed, never raw Omniglot).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metadist.algorithms import eval_inner
from metadist.checkpoint import CheckpointManager, load_model
from metadist.data.prepare import shards_dir
from metadist.data.split import EpisodeSource
from metadist.data.store import Access
from metadist.errors import MetadistError
from metadist.evaluate import evaluate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--splits", default="val,test")
    ap.add_argument(
        "--steps", type=int, default=0, help="test inner steps (0 = the run's eval.inner_steps)"
    )
    ap.add_argument(
        "--shards", default="", help="shards folder or URL prefix (default: each run's own)"
    )
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    try:
        curve(args)
    except MetadistError as e:
        raise SystemExit(f"curve: error: {e}") from None


def curve(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 (appended to as rows come)
    episodes = {}
    print(
        f"{'run':<28} {'step':>6} {'minutes':>8} "
        + " ".join(f"{s:>15}" for s in args.splits.split(",")),
        flush=True,
    )
    for run in args.runs:
        for ck in CheckpointManager(Path(run), 1, 1, False, None, {}).complete():
            model, cfg = load_model(ck / "model.safetensors")
            model.to(device)
            meta = json.loads((ck / "meta.json").read_text())
            rec = {
                "run": Path(run).name,
                "step": meta["step"],
                "elapsed_s": meta["elapsed"],
                "tasks_seen": meta["tasks_seen"],
            }
            for split in args.splits.split(","):
                root = args.shards or shards_dir(cfg.data)
                if (str(root), split) not in episodes:
                    episodes[str(root), split] = EpisodeSource(
                        root, split, access=Access.of(cfg.data)
                    ).all()
                inner = eval_inner(cfg.algo, cfg.eval, model, cfg.data.ways, args.steps or None)
                r = evaluate(
                    model, episodes[str(root), split], inner, cfg.eval.tasks_per_batch, device
                )
                rec[split], rec[split + "_ci95"] = r["accuracy"], r["ci95"]
            print(
                f"{rec['run']:<28} {rec['step']:>6} {rec['elapsed_s'] / 60:>8.2f} "
                + " ".join(
                    f"{rec[s]:>8.4f}+-{rec[s + '_ci95']:.3f}" for s in args.splits.split(",")
                ),
                flush=True,
            )
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
