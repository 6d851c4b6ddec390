"""`metadist plot`: learning curves from a run's metrics.jsonl (accuracy against steps and wall
time)."""

from __future__ import annotations

import json
from pathlib import Path

from metadist.errors import MetadistError


def plot(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in run_dirs:
        _plot_run(axes, Path(run))
    axes[0].set_xlabel("meta-step")
    axes[1].set_xlabel("wall time (min)")
    for ax in axes:
        ax.set_ylabel("accuracy (faint: train query; dots: val)")
        ax.set_ylim(0.8, 1.0)  # the interesting part; early steps run off the bottom
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_run(axes, run: Path) -> None:
    """One run's training and validation accuracy against steps and minutes, and its test mark."""
    metrics = Path(run) / "metrics.jsonl"
    if not metrics.is_file():
        raise MetadistError(
            f"{run}: no metrics.jsonl (not a metadist run folder, or it has not logged a step)"
        )
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    if not recs:
        raise MetadistError(f"{run}: metrics.jsonl is empty")
    train = [r for r in recs if "accuracy" in r]
    val = [r for r in recs if "val_accuracy" in r]
    name = Path(run).name
    for ax, x in ((axes[0], "step"), (axes[1], "elapsed_s")):
        scale = 60.0 if x == "elapsed_s" else 1.0
        (line,) = ax.plot(
            [r[x] / scale for r in train], [r["accuracy"] for r in train], alpha=0.35, lw=1
        )
        ax.plot(
            [r[x] / scale for r in val],
            [r["val_accuracy"] for r in val],
            "o-",
            color=line.get_color(),
            ms=3,
            label=f"{name} val",
        )
        summary = Path(run) / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            at = s["steps"] if x == "step" else s["wall_time_s"] / 60
            ax.errorbar(
                [at],
                [s["test_accuracy"]],
                yerr=[s["test_ci95"]],
                fmt="*",
                ms=10,
                color=line.get_color(),
                label=f"{name} test {s['test_accuracy']:.3f}",
            )
