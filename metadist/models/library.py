"""Any torchvision or timm network as the body: `model.backbone=torchvision:<name>` or
`model.backbone=timm:<name>`.

The network is built by its library without downloading anything (random weights; a pre-trained
start is `model.init=<file>`), for the shards' image size (timm's `img_size`, torchvision's
`image_size` where the network takes one: a ViT's position embedding is made for it), its
classifier replaced by metadist's head. One-channel images are fed as three equal channels (what
timm's `in_chans=1` conversion of pre-trained weights computes), so a library's own RGB weights
fit as they are.

BatchNorm runs on batch statistics and keeps no running statistics, as metadist's own networks:
each task is normalised by its own images, in training and at test (the running statistics of a
pre-trained file are not used). LayerNorm needs nothing.

Per-task weights go through `torch.func.functional_call`, one task at a time (the plan measures
nothing and computes one task at a time: step/plan.py's `one_at_a_time`), so every algorithm runs:
MAML's inner loop adapts any parameter by name. Second-order MAML needs attention whose second
derivative torch has: timm's attention runs its plain (unfused) path; torchvision's
`nn.MultiheadAttention` has no second derivative on a CPU and is refused in one line.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch import nn
from torch.func import functional_call

from metadist.config import ConfigError
from metadist.errors import WeightsError
from metadist.models.common import Backbone, InnerRates

LIBRARIES = ("torchvision", "timm")
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
STATS = ("running_mean", "running_var", "num_batches_tracked")
# the containers a checkpoint file may wrap its tensors in (timm's, DINO's, Lightning's)
CONTAINERS = ("state_dict", "model", "teacher", "student", "model_ema", "state_dict_ema")


def parse(backbone: str) -> tuple[str, str] | None:
    """("timm", "vit_tiny_patch16_224") for "timm:vit_tiny_patch16_224"; None for metadist's own."""
    if ":" not in backbone:
        return None
    lib, _, name = backbone.partition(":")
    return lib, name


@functools.cache
def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "model.backbone=timm:...: timm is not installed; pip install 'metadist[timm]' "
            "(or pip install timm)"
        ) from None
    return timm


def check(backbone: str) -> None:
    """A library and a network it has, or one ConfigError line."""
    lib, name = parse(backbone)
    if lib not in LIBRARIES:
        raise ConfigError(
            f"model.backbone={backbone!r}: the library is torchvision or timm "
            "(e.g. torchvision:resnet18, timm:vit_small_patch16_224)"
        )
    if lib == "timm":
        known = _timm().list_models()
    else:
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        near = [k for k in known if name and (name in k or k in name)][:6]
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(
            f"model.backbone={backbone!r}: {lib} has no classification network {name!r}{hint}"
        )


def _create(lib: str, name: str, side: int) -> tuple[nn.Module, str]:
    """The library's network for `side` px images, random weights, and its classifier's name."""
    if lib == "timm":
        timm = _timm()
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0, img_size=side)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            net = timm.create_model(name, pretrained=False, num_classes=0)
        return net, net.pretrained_cfg.get("classifier", "head")
    import torchvision

    try:
        net = torchvision.models.get_model(name, weights=None, image_size=side)
    except TypeError as e:
        if "image_size" not in str(e):
            raise
        net = torchvision.models.get_model(name, weights=None)
    return net, _drop_classifier(net, name)


def _drop_classifier(net: nn.Module, name: str) -> str:
    """Replace torchvision's final 1000-way linear layer by nn.Identity; returns its name."""
    last = [
        k for k, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1000
    ]
    if not last:
        raise ConfigError(
            f"model.backbone=torchvision:{name}: no linear classifier to replace (its last layer "
            "is not an nn.Linear); use a network that ends in one"
        )
    parent, _, leaf = last[-1].rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
    return last[-1]


def _batch_statistics(net: nn.Module) -> None:
    """Every BatchNorm normalises with the batch's statistics and keeps none."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            for k in STATS:
                m.register_buffer(k, None)


class Library(Backbone):
    """A torchvision or timm network (`net`, its classifier removed) and metadist's head."""

    def __init__(self, spec: str, image_shape, ways: int, rates: InnerRates, second_order: bool):
        super().__init__()
        self.spec = spec
        lib, name = parse(spec)
        c, side, _ = image_shape
        try:
            self.net, self.classifier = _create(lib, name, side)
        except (RuntimeError, AssertionError, ValueError) as e:
            raise self._wrong_size(image_shape, e) from None
        _batch_statistics(self.net)
        if second_order:
            self._second_order(lib)
        self.channels = c
        self.feature_dim = self._probe(image_shape)
        self.norms = frozenset(
            f"net.{m}.{p}" if m else f"net.{p}"
            for m, mod in self.net.named_modules()
            if isinstance(mod, NORMS)
            for p, _ in mod.named_parameters(recurse=False)
        )
        self.finish(ways, rates)

    def _second_order(self, lib: str) -> None:
        """Attention with a second derivative: timm's plain path; torchvision's is refused."""
        for m in self.net.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
            if isinstance(m, nn.MultiheadAttention):
                raise ConfigError(
                    f"model.backbone={self.spec}: its nn.MultiheadAttention has no second "
                    "derivative on this torch, so second-order MAML cannot train it; use "
                    "algo.name=fomaml, anil or protonet, or the timm network of the same name"
                )

    def _probe(self, image_shape) -> int:
        """The feature width, from one forward of two images; a network that cannot take this
        image size is one line."""
        x = torch.rand(2, *image_shape)
        try:
            with torch.no_grad():
                f = self.net(self._rgb(x))
        except (RuntimeError, AssertionError, ValueError) as e:
            raise self._wrong_size(image_shape, e) from None
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            raise ConfigError(
                f"model.backbone={self.spec}: its forward returns "
                f"{type(f).__name__ if not isinstance(f, torch.Tensor) else tuple(f.shape)}, not "
                "one feature vector an image; use a classification network"
            )
        return f.shape[1]

    def _wrong_size(self, image_shape, e: Exception) -> ConfigError:
        return ConfigError(
            f"model.backbone={self.spec}: does not run on {'x'.join(map(str, image_shape))} "
            f"images ({str(e).splitlines()[0]}); choose another data.image_size or network"
        )

    def _rgb(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if self.channels == 1 else x

    def is_norm(self, name: str) -> bool:
        return name in self.norms

    def features(self, x):
        return self.net(self._rgb(x))

    def tasks_features(self, params, x, step=0, native_norm=False, rng=None, mask=None):
        """One task at a time through functional_call, each with its own weights (params[k][t]);
        with a `mask`, a task's network sees its real images alone (its padding rows give 0)."""
        # unbind, not v[t]: indexing's backward writes a zero tensor of all T tasks for each task
        # (T^2 of a network's weights a step), unbind's stacks the T gradients once
        body = {k[4:]: v.unbind(0) for k, v in params.items() if k.startswith("net.")}
        out = []
        for t in range(x.shape[0]):
            xt = x[t] if mask is None else x[t][mask[t]]
            f = functional_call(self.net, {k: v[t] for k, v in body.items()}, (self._rgb(xt),))
            if mask is not None:
                f = f.new_zeros(x.shape[1], f.shape[1]).index_copy(
                    0, mask[t].nonzero().squeeze(1), f
                )
            out.append(f)
        return torch.stack(out)

    # ---- model.init from a library's own checkpoint ----
    def init_weights(self, weights: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
        """A weights file's tensors as this model's: a library's own checkpoint (its names, its
        classifier, its BatchNorm running statistics, a ViT's position embedding for another
        size) or metadist's (`net.` names). Every body tensor must be there with its shape: the
        first that is not is one WeightsError line."""
        weights = unwrap(weights)
        if not any(k.startswith("net.") for k in weights):
            weights = self._library_names(weights)
        own = {k: v for k, v in self.state_dict().items() if k.startswith("net.")}
        classifier = f"net.{self.classifier}."
        weights = {
            k: v
            for k, v in weights.items()
            if not k.startswith(classifier) and k.rpartition(".")[2] not in STATS
        }
        where = f"model.init={path}"
        for k, v in weights.items():
            if k.startswith("net.") and k not in own:
                raise WeightsError(
                    f"{where}: tensor {k[4:]!r} is not in {self.spec} (its first tensors: "
                    f"{', '.join(n[4:] for n in list(own)[:3])}); is the file of this network?"
                )
            if k in own and v.shape != own[k].shape:
                raise WeightsError(
                    f"{where}: tensor {k.removeprefix('net.')!r} is {tuple(v.shape)} in the file; "
                    f"{self.spec} at this image size expects {tuple(own[k].shape)}"
                )
        missing = [k for k in own if k not in weights]
        if missing:
            raise WeightsError(
                f"{where}: no tensor {missing[0][4:]!r} ({len(missing)} of {self.spec}'s "
                f"{len(own)} tensors missing); is the file of this network?"
            )
        return weights

    def _library_names(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A library's checkpoint: its position embedding resized to this image size (timm's own
        filter, or torchvision's interpolate_embeddings), the names prefixed with `net.`."""
        lib, _ = parse(self.spec)
        if lib == "timm":
            filt = getattr(sys.modules[type(self.net).__module__], "checkpoint_filter_fn", None)
            if filt is not None:
                # a file of another network fails here: the name check of init_weights says so
                with contextlib.suppress(Exception):
                    weights = filt(dict(weights), self.net)
        else:
            own = self.net.state_dict()
            k = "encoder.pos_embedding"
            if k in weights and k in own and weights[k].shape != own[k].shape:
                from torchvision.models.vision_transformer import interpolate_embeddings

                weights = interpolate_embeddings(
                    self.net.image_size, self.net.patch_size, dict(weights)
                )
        return {f"net.{k}": v for k, v in weights.items()}


def unwrap(weights: dict) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: inside its container (state_dict, model, DINO's teacher ...),
    DataParallel's `module.` and DINO's `backbone.` prefixes taken off."""
    for key in CONTAINERS:
        if isinstance(weights.get(key), dict):
            weights = weights[key]
            break
    weights = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "backbone."):
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix) :]: v for k, v in weights.items()}
        elif any(k.startswith(prefix) for k in weights) and prefix == "backbone.":
            # DINO's student/teacher: the backbone and a projection head; the backbone alone
            weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    return weights


def build(spec: str, ways: int, image_shape, model, rates: InnerRates, second_order: bool):
    """The network `spec` names for `image_shape` with a head of `ways` rows."""
    check(spec)
    if model.dropblock:
        raise ConfigError(
            f"model.dropblock={model.dropblock}: DropBlock is ResNet-12's; a {spec} network "
            "takes its own regularisation"
        )
    if rates.per_step_bn:
        raise ConfigError(
            f"algo.per_step_bn=true: per-step BatchNorm weights are a (steps, C) table of "
            f"metadist's own networks; {spec}'s normalisation layers have one set of weights"
        )
    return Library(spec, image_shape, ways, rates, second_order)
