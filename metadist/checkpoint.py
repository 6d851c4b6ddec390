"""Everything a run writes to resume or to be evaluated: the weights format and checkpoints.

Weights (`*.safetensors`): the model's tensors (plain parameter names, float32) with metadata
`format`, `config` (the run's whole config), `step` and `val_accuracy`, so any weights file is
self-describing: `load_model(path)` rebuilds the architecture from its config and checks that the
tensors fit it.

Checkpoints: <run>/checkpoints/step_NNNNNN/{model.safetensors, optimizer.pt, meta.json}: the
model, the optimizer and schedule, and the `TrainState` (meta.json, readable): the step, the
best validation so far, the wall time, and how the run computes (the step's plan and why, the
threads), with the world size and data position of the launch that wrote it, and the
schedule's step count. `CheckpointManager` holds these stateful parts: every way a run continues
(a relaunch, preemption, an elastic restart at another world size, after a SIGKILL) goes through
its `save(step)` and `restore()`, and nothing else knows the format. A checkpoint is written in a
hidden temporary folder and renamed when complete; one whose write failed (disk full, no permission)
or whose process died is never found, the previous one stays complete, and the error names the
path. `latest()` is found on disk, not remembered.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metadist import config as config_mod
from metadist.algorithms import model_of
from metadist.errors import MetadistError, WeightsError
from metadist.models import Backbone, backbone_weights

__all__ = [
    "CheckpointManager",
    "Parts",
    "TrainState",
    "backbone_weights",
    "load_init",
    "load_model",
    "load_weights",
    "save_weights",
]

FORMAT = "metadist-weights-1"
_STEP = re.compile(r"^step_(\d{6,})$")


class CheckpointError(MetadistError):
    """A checkpoint or weights file could not be written."""


def save_weights(
    model: torch.nn.Module,
    path: Path,
    config: dict,
    step: int,
    val: float | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the model's weights (or `tensors`, some of them) with their metadata (`config`: the
    run's config as a dict), atomically (a temporary file renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"config": config, "step": step, "val_accuracy": val, "format": FORMAT}
    state = {
        k: v.detach().float().cpu().contiguous() for k, v in (tensors or model.state_dict()).items()
    }
    try:
        save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {e}") from None


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a weights file, as stored."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(str(path)), meta


def load_model(path: str | Path) -> tuple[Backbone, config_mod.Config]:
    """A run folder (best.safetensors, else model.safetensors), a checkpoint folder, a weights
    file or a shipped learner's name (metadist.learners) -> (model with those weights, the config
    it was trained with)."""
    from metadist import learners

    path = learners.resolve(path)
    if path.is_dir():
        found = [
            path / n for n in ("best.safetensors", "model.safetensors") if (path / n).is_file()
        ]
        if not found:
            raise WeightsError(
                f"{path}: no best.safetensors or model.safetensors (has this run trained?)"
            )
        path = found[0]
    weights, meta = _read_weights(
        path,
        "weights not found: {path} (a run folder, a weights file, or a shipped learner: "
        + ", ".join(learners.names())
        + ")",
        "{path}: not a metadist weights file ({e})",
    )
    if "config" not in meta:
        raise WeightsError(f"{path}: no config in its metadata (not written by metadist)")
    cfg = config_mod.from_dict(meta["config"])
    d = cfg.data
    try:
        model = model_of(
            cfg.model,
            cfg.algo,
            (d.channels, d.image_size, d.image_size),
            weights["head.weight"].shape[0] if "head.weight" in weights else d.ways,
        )
    except config_mod.ConfigError as e:
        raise WeightsError(f"{path}: its config does not build a model here ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise WeightsError(
            f"{path}: weights do not fit the architecture in its config (first differences: {diff})"
        )
    model.load_state_dict(weights)
    return model, cfg


def _read_weights(path: Path, missing: str, unreadable: str):
    """load_weights(path), its failures one WeightsError line (`missing`/`unreadable` name the
    caller's setting: {path}, {e})."""
    if not path.is_file():
        raise WeightsError(missing.format(path=path))
    try:
        return load_weights(path)
    except Exception as e:
        raise WeightsError(unreadable.format(path=path, e=e)) from None


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def read_init(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a torch checkpoint (.pth, .pt, .bin,
    .ckpt, .tar: read with weights_only, so nothing in it runs)."""
    if path.suffix not in TORCH_SUFFIXES:
        return _read_weights(
            path,
            "model.init={path}: no such weights file",
            "model.init={path}: not a weights file ({e}); safetensors, or a torch checkpoint "
            f"named {', '.join(TORCH_SUFFIXES)}",
        )[0]
    if not path.is_file():
        raise WeightsError(f"model.init={path}: no such weights file")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"model.init={path}: not a torch checkpoint ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(weights, dict):
        raise WeightsError(
            f"model.init={path}: holds a {type(weights).__name__}, not a dict of tensors"
        )
    return weights


def load_init(model: torch.nn.Module, path: str | Path) -> list[str]:
    """model.init: start from the tensors of the weights file at `path` (same names, same shapes;
    e.g. a pre-training run's backbone.safetensors, or any run's weights; for a torchvision or
    timm network also that library's own checkpoint, models/library.py). A tensor of the file
    the model does not have, or of another shape, is an error naming it; returns the model's
    tensors the file does not hold (they keep their initialisation: the head, the rates)."""
    path = Path(path)
    weights = read_init(path)
    if hasattr(model, "init_weights"):
        weights = model.init_weights(weights, path)
    own = model.state_dict()
    unknown = sorted(k for k in weights if k not in own)
    shapes = sorted(
        f"{k} {tuple(weights[k].shape)} (the model's {tuple(own[k].shape)})"
        for k in weights
        if k in own and weights[k].shape != own[k].shape
    )
    if unknown or shapes:
        what = (
            [f"not in the model: {', '.join(unknown[:6])}" + (" ..." if len(unknown) > 6 else "")]
            if unknown
            else []
        ) + (
            [f"other shapes: {', '.join(shapes[:4])}" + (" ..." if len(shapes) > 4 else "")]
            if shapes
            else []
        )
        raise WeightsError(
            f"model.init={path}: its tensors do not fit this model ({'; '.join(what)}); "
            "model.backbone, model.* and data.channels must be those it was trained with"
        )
    model.load_state_dict({k: weights[k] for k in weights}, strict=False)
    return sorted(k for k in own if k not in weights)


@dataclass
class TrainState:
    """Everything besides weights, optimizer and schedule that continuing a run exactly needs.
    Randomness is named by (seed, step, task), so no RNG state is part of it."""

    step: int = 0
    best_val: float = -1.0
    best_step: int = 0
    elapsed: float = 0.0  # training wall time, summed over launches
    tasks_seen: int = 0
    # the meta-step's plan (metadist.step.plan.Plan.record()): decided when the run started, kept
    # on every resume
    plan: dict = dataclasses.field(default_factory=dict)
    # intra-op threads per process (float32 rounding on a CPU depends on it)
    threads: int = 0
    world_size: int = 1  # of the launch that wrote the checkpoint
    meta_batch_size: int = 0
    seed: int = 0

    @property
    def data_position(self) -> int:
        """Episodes of the train stream consumed: the next step reads from here."""
        return self.step * self.meta_batch_size

    def to_meta(self) -> dict:
        return dict(dataclasses.asdict(self), data_position=self.data_position)

    def load_meta(self, meta: dict) -> None:
        """From a checkpoint's meta.json (older checkpoints lack the newer fields: defaults)."""
        fresh = TrainState()
        for f in dataclasses.fields(self):
            setattr(self, f.name, meta.get(f.name, getattr(fresh, f.name)))


@dataclass
class Parts:
    """The stateful parts of a run that a checkpoint holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object  # metadist.schedule.Schedule (state_dict / load_state_dict)
    state: TrainState


class CheckpointManager:
    """Owns <run>/checkpoints and the run's stateful parts: when to save (every `every` steps, at
    the end, on request), how to save atomically, keeping the last `keep`, and how to restore."""

    def __init__(
        self, run_dir: Path, every: int, keep: int, is_main: bool, parts: Parts, config: dict
    ):
        self.dir = Path(run_dir) / "checkpoints"
        self.every, self.keep, self.is_main, self.parts, self.config = (
            every,
            keep,
            is_main,
            parts,
            config,
        )

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def save_best(self, step: int, accuracy: float) -> None:
        """<run>/best.safetensors: the weights of the best validation so far (main process)."""
        best = self.dir.parent / "best.safetensors"
        save_weights(self.parts.model, best, self.config, step, accuracy)

    def save(self, step: int) -> Path:
        """Main process writes step_NNNNNN of every part; every process returns its path."""
        final = self.dir / f"step_{step:06d}"
        if not self.is_main:
            return final
        tmp = self.dir / f".tmp-step_{step:06d}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._write(tmp, step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except (OSError, CheckpointError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = self.latest()
            keep = (
                f"the previous checkpoint {prev} is intact"
                if prev
                else "no earlier checkpoint exists"
            )
            raise CheckpointError(
                f"cannot write checkpoint {final}: {str(e).removeprefix('cannot write ')}; {keep}"
            ) from None
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def time_write(self) -> float:
        """Seconds to write one checkpoint of the parts as they are, into a scratch folder that is
        removed again (the budget schedule counts it per checkpoint); 0 on other ranks, or where
        the folder cannot be written (the first real checkpoint then says why)."""
        if not self.is_main:
            return 0.0
        scratch = self.dir / f".probe-{os.getpid()}"
        t = time.perf_counter()
        try:
            scratch.mkdir(parents=True, exist_ok=True)
            self._write(scratch, 0)
            return time.perf_counter() - t
        except (OSError, CheckpointError):
            return 0.0
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _write(self, folder: Path, step: int) -> None:
        p = self.parts
        save_weights(p.model, folder / "model.safetensors", self.config, step)
        schedule = p.schedule.state_dict()
        # serialised in memory: a failing disk then fails a plain write (OSError)
        buf = io.BytesIO()
        torch.save({"optimizer": p.optimizer.state_dict(), "scheduler": schedule["scheduler"]}, buf)
        (folder / "optimizer.pt").write_bytes(buf.getvalue())
        meta = dict(
            p.state.to_meta(), schedule_steps=schedule["steps"], metadist_config=self.config
        )
        (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [
            p for p in self.dir.iterdir() if _STEP.match(p.name) and (p / "meta.json").is_file()
        ]
        return sorted(found, key=lambda p: int(_STEP.match(p.name)[1]))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def restore(self, path: Path | None = None) -> Path | None:
        """Load checkpoint `path` (default: the latest complete one) into every part; returns its
        path, or None when there is none."""
        path = path or self.latest()
        if path is None:
            return None
        p = self.parts
        p.model.load_state_dict(load_weights(path / "model.safetensors")[0])
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        p.optimizer.load_state_dict(opt_state["optimizer"])
        meta = json.loads((path / "meta.json").read_text())
        p.schedule.load_state_dict(
            {"scheduler": opt_state["scheduler"], "steps": meta.get("schedule_steps", 0)}
        )
        p.state.load_meta(meta)
        return path
