"""Backbones as a table: `BACKBONES` maps `model.backbone` to the function that builds it. Each
backbone is one file here and a `Backbone` (models/common.py): how it is built, how many tasks run
at once with per-task weights (`tasks_features`), which parameters are its BatchNorm weights (no
inner rate when they are per step) and which form the head (what ANIL adapts). Adding a backbone
is one file and one line in this table.

`build_model(cfg, image_shape)` is the model a config describes; `load_init(model, path)` starts it
from a weights file (model.init: a pre-trained start).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from metadist.config import ConfigError
from metadist.models import conv4, resnet12
from metadist.models.common import Backbone, is_lr, lr_key

if TYPE_CHECKING:
    from metadist.config import Config

BACKBONES = {
    "conv4": conv4.build,
    "resnet12": resnet12.build,
}


def check(cfg: Config) -> None:
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone={cfg.model.backbone!r}: allowed values are {', '.join(BACKBONES)}")


def build_model(cfg: Config, image_shape: tuple[int, int, int] | None = None, ways: int | None = None) -> Backbone:
    """The model of `cfg` for images of `image_shape` (C, H, W): the shards' manifest says it;
    by default the config's data.channels and data.image_size (what the manifest must match).
    `ways`: the head's rows (default: data.ways, or 1 for algo.head_init=shared's one shared row)."""
    check(cfg)
    c, h, w = image_shape or (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    a = cfg.algo
    rows = ways or (1 if a.head_init == "shared" else cfg.data.ways)
    return BACKBONES[cfg.model.backbone](rows, (c, h, w), cfg.model, learn_lr=a.learn_inner_lr,
                                         lr_init=a.inner_lr, steps=a.inner_steps, per_step_bn=a.per_step_bn)


__all__ = ["BACKBONES", "Backbone", "build_model", "check", "is_lr", "lr_key"]
