"""Backbones as a table: `BACKBONES` maps `model.backbone` to the function that builds it. Each
backbone is one file here and a `Backbone` (models/common.py): how it is built, how many tasks run
at once with per-task weights (`tasks_features`), which parameters are its BatchNorm weights (no
inner rate when they are per step) and which form the head (what ANIL adapts). Adding a backbone
is one file and one line in this table. `model.backbone=torchvision:<name>` or `timm:<name>`
is any network of those libraries (models/library.py).

`build_model(model_cfg, algo_cfg, image_shape, ways)` is the model a config describes;
`checkpoint.load_init(model, path)` starts it from a weights file (model.init: a pre-trained start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metadist.config import ConfigError
from metadist.models import conv4, library, resnet12
from metadist.models.common import Backbone, InnerRates, is_lr, lr_key

if TYPE_CHECKING:
    import torch

    from metadist.config import AlgoConfig, ModelConfig

BACKBONES = {
    "conv4": conv4.build,
    "resnet12": resnet12.build,
}


def check(m: ModelConfig) -> None:
    if library.parse(m.backbone):
        return library.check(m.backbone)
    if m.backbone not in BACKBONES:
        raise ConfigError(
            f"model.backbone={m.backbone!r}: allowed values are {', '.join(BACKBONES)}, "
            "torchvision:<name> or timm:<name>"
        )


def build_model(
    m: ModelConfig,
    a: AlgoConfig,
    image_shape: tuple[int, int, int],
    ways: int,
    *,
    second_order: bool,
) -> Backbone:
    """The model of section `m` for images of `image_shape` (C, H, W: the shards' manifest says
    it) with a head of `ways` rows; algo section `a` says which inner learning rates it learns and
    whether its BatchNorm weights are per inner step; `second_order`: training differentiates its
    backward again (the algorithm says so: metadist.algorithms.model_of builds a run's model)."""
    check(m)
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    rates = InnerRates(a.learn_inner_lr, a.inner_lr, a.inner_steps, a.per_step_bn)
    if library.parse(m.backbone):
        return library.build(m.backbone, ways, (c, h, w), m, rates, second_order)
    return BACKBONES[m.backbone](ways, (c, h, w), m, rates)


def backbone_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The body's weights: no head, no learned inner rates (what a pre-training run hands on)."""
    return {
        k: v for k, v in model.state_dict().items() if not k.startswith("head.") and not is_lr(k)
    }


__all__ = [
    "BACKBONES",
    "Backbone",
    "InnerRates",
    "backbone_weights",
    "build_model",
    "check",
    "is_lr",
    "lr_key",
]
