"""Experiment tracking: the only module that imports wandb. Main process only.

`make_tracker(tracking, name, config, run_dir, is_main)` returns a W&B tracker (offline by default,
online when asked) or a null tracker with the same methods, so the loop never asks `if use_wandb`.
The W&B run id is kept in <run>/wandb_id, so a resumed run continues the same W&B run. A tracking
failure is reported once and never stops training.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path


class NullTracker:
    def log(self, metrics: dict, step: int) -> None: ...
    def summary(self, values: dict) -> None: ...
    def log_model(self, path: Path) -> None: ...
    def finish(self) -> None: ...


class WandbTracker(NullTracker):
    """tracking: the tracking section (mode, project, entity); name: the run's; config: the run's
    config as a dict."""

    def __init__(self, tracking, name: str, config: dict, run_dir: Path):
        import wandb

        self.wandb, self.broken = wandb, False
        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=tracking.project,
            entity=tracking.entity or None,
            name=name,
            group=tracking.group or None,
            id=run_id,
            resume="allow",
            mode=tracking.mode,
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def _guard(self, fn, *args):
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as e:  # tracking must never stop training
            self.broken = True
            print(
                f"metadist: W&B tracking failed and is off for the rest of the run: {e}",
                file=sys.stderr,
            )

    def log(self, metrics, step):
        self._guard(lambda: self.run.log(metrics, step=step))

    def summary(self, values):
        self._guard(lambda: self.run.summary.update(values))

    def log_model(self, path):
        def upload():
            art = self.wandb.Artifact(f"{self.run.name}-weights", type="model")
            art.add_file(str(path))
            self.run.log_artifact(art)

        self._guard(upload)

    def finish(self):
        self._guard(self.run.finish)


def make_tracker(tracking, name: str, config: dict, run_dir: Path, is_main: bool):
    if not is_main or tracking.mode == "disabled":
        return NullTracker()
    try:
        return WandbTracker(tracking, name, config, run_dir)
    except Exception as e:
        print(
            f"metadist: W&B tracking could not start ({e}); training goes on without it",
            file=sys.stderr,
        )
        return NullTracker()
