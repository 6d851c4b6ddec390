"""Checkpoints: save everything to continue a run, find the latest complete one, keep the last K.

Layout: <run>/checkpoints/step_NNNNNN/{model.safetensors, optimizer.pt, meta.json}. A checkpoint
is written in a hidden temporary folder and renamed when complete, so one half-written when the
process died is never found. `latest()` is found on disk, not remembered. The model is saved
unwrapped (plain parameter names), so no key surgery is ever needed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step_(\d{6,})$")


def save_weights(model: torch.nn.Module, path: Path, meta: dict) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(str(path)), meta


class Checkpointer:
    def __init__(self, run_dir: Path, every: int, keep: int, is_main: bool):
        self.dir = Path(run_dir) / "checkpoints"
        self.every, self.keep, self.is_main = every, keep, is_main

    def should_save(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def maybe_save(self, step: int, last: bool, state_fn) -> Path | None:
        """`state_fn()` -> (model, optimizer state dict, meta dict, weights metadata); main process
        writes. The weights file carries its config, so `metadist evaluate --run <checkpoint>` works."""
        if not self.should_save(step, last):
            return None
        final = self.dir / f"step_{step:06d}"
        if self.is_main:
            model, opt_state, meta, weights_meta = state_fn()
            tmp = self.dir / f".tmp-step_{step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_weights(model, tmp / "model.safetensors", weights_meta)
            torch.save(opt_state, tmp / "optimizer.pt")
            (tmp / "meta.json").write_text(json.dumps(dict(meta, step=step), indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _STEP.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: int(_STEP.match(p.name)[1]))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    @staticmethod
    def load(path: Path) -> tuple[dict, dict, dict]:
        weights, _ = load_weights(path / "model.safetensors")
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        return weights, opt_state, json.loads((path / "meta.json").read_text())
