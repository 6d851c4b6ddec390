"""Export what a learner adapted to one task: its classifier (the network with the adapted weights,
inner rates applied, BatchNorm as it runs at test: on the statistics of the images given together),
or for any algorithm the embedding network alone (ProtoNets' and pre-training's prototypes are
then computed outside: class means of the support's embeddings). Input: the preprocessed images
(n, C, H, W) float in [0, 1] (`Learner.preprocess`); output: logits (n, ways), or features.
`write(module, shape, path)` exports any module taking such images (the API's Task.export and
Learner.export_embedding call it with these two).

Two formats, by the file's suffix: `.onnx` (torch.onnx's exporter, one file with its weights up
to protobuf's 2 GB, beyond that a .onnx.data beside it; run it with onnxruntime) and
`.pt2` (a torch.export program: `torch.export.load(path).module()(x)`). The packages are an
optional extra (`pip install metadist[export]`: onnx, onnxscript, onnxruntime); without them
exporting to ONNX is one line saying what to install.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from metadist.algorithms.core import Forward
from metadist.errors import MetadistError

FORMATS = (".onnx", ".pt2")


class ExportError(MetadistError):
    pass


class TaskClassifier(nn.Module):
    """One adapted task's classifier: `model` with the task's adapted `weights` (each (1, *shape))
    at inner step `step`, (n, C, H, W) -> logits (n, ways). BatchNorm is written from mean and
    variance (the composite form, which every exporter reads), on the statistics of the images of
    one call, as at test."""

    def __init__(self, model: nn.Module, weights: dict, step: int, ways: int):
        super().__init__()
        self.names = list(weights)
        for i, k in enumerate(self.names):
            self.register_buffer(f"w{i}", weights[k].detach().clone())
        self.forward_ = Forward(model, one_at_a_time=False, native=False)  # composite BatchNorm
        self.step, self.ways = step, ways

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {k: getattr(self, f"w{i}") for i, k in enumerate(self.names)}
        return self.forward_(weights, x[None], self.step)[0][:, : self.ways]


class Embedding(nn.Module):
    """The body of a learner's network: (n, C, H, W) -> features (n, feature_dim)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def write(module: nn.Module, shape: tuple, path: Path, device="cpu") -> Path:
    """`module` traced on an example input of `shape` (n, C, H, W; fixed random images on
    `device`), its batch size free (any number of images from 2), to `path`."""
    path = Path(path)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(max(2, shape[0]), *shape[1:], generator=g).to(device)
    if path.suffix not in FORMATS:
        raise ExportError(
            f"{path}: the format is chosen by the suffix, one of {', '.join(FORMATS)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("images", min=2)
    if path.suffix == ".pt2":
        program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
        torch.export.save(program, path)
        return path
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError(
            "exporting to ONNX needs the export extra: pip install 'metadist[export]' "
            "(onnx, onnxscript, onnxruntime)"
        ) from None
    # one file (weights inside) unless they pass protobuf's 2 GB: a downloaded or copied .onnx
    # then works alone (torch writes a .onnx.data beside it by default)
    big = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > 1.8e9
    torch.onnx.export(
        module,
        (x,),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: batch},),
        external_data=big,
        verbose=False,
    )
    return path
