"""`make bench-budget`: does the budget schedule's fit hold on this machine? protonet.yaml (the
recipe that fits its step count to train.max_minutes) trained under several budgets; for each,
the steps the schedule planned at its probe and at its refit, the steps reached when the run
ended, and the training time used. The fit holds where every planned count is reached inside its
budget, using at least 97% of it.

  python bench/budget.py [--minutes 1 2 4] [--config configs/protonet.yaml] [key=value ...]

Each budget is a fresh run (run.fresh=true) in a temporary runs folder; the timings are the
per-machine cache's (metadist/machine.py), measured by the first run and read by the others, as
the same command on this machine always does. Needs the config's shards (metadist prepare).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    from metadist import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--config", default=str(ROOT / "configs/protonet.yaml"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    print(
        f"CPU: {machine.cpu_model()}; {args.config}; {time.strftime('%Y-%m-%d')}; "
        f"overrides {' '.join(args.overrides) or '-'}"
    )
    print(
        f"{'budget min':>10} {'probe fit':>9} {'refit':>8} {'reached':>8} {'train min':>10} "
        f"{'used':>6} {'s/step probe':>13} {'steady':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in args.minutes:
            name = f"budget-{minutes:g}"
            cmd = [
                sys.executable,
                "-m",
                "metadist",
                "train",
                "--config",
                args.config,
                *args.overrides,
                f"train.max_minutes={minutes:g}",
                "train.budget_schedule=true",
                f"run.root={tmp}",
                f"run.name={name}",
                "run.fresh=true",
                "tracking.mode=disabled",
            ]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{name}: metadist train failed:\n{r.stderr[-2000:]}")
            run = Path(tmp) / name
            plan = json.loads((run / "schedule.json").read_text())
            summary = json.loads((run / "summary.json").read_text())
            probe, refit = plan["probe"], plan.get("refit", {})
            used = summary["wall_time_s"] / 60 / minutes
            print(
                f"{minutes:>10g} {probe['fits']:>9} {plan['steps']:>8} {summary['steps']:>8} "
                f"{summary['wall_time_s'] / 60:>10.2f} {used:>6.1%} {probe['step_s']:>13.4f} "
                f"{refit.get('steady_step_s', float('nan')):>7.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
