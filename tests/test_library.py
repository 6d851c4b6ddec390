"""torchvision and timm networks as backbones (metadist/models/library.py): built for the image
shape without downloading, started from weights files the tests write in each library's own
format (torchvision's state dict with its classifier and running statistics, timm's at another
image size, DINO's container, safetensors), a mismatching file one line; the meta-gradient of one
network of each library equals a per-task float64 reference written here on the library's plain
network; exact mode's groups give the same bits at every world size; every algorithm trains."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch.func import functional_call

from metadist import config
from metadist.algorithms import maml, model_of
from metadist.algorithms.core import Inner
from metadist.checkpoint import WeightsError, load_init, load_weights
from metadist.step.compute import Eager, meta_backward
from tests.conftest import ROOT, model_for, run_cli, small_overrides

timm = pytest.importorskip("timm")

RESNET, VIT = "torchvision:resnet18", "timm:vit_tiny_patch16_224"


def ours(backbone: str, side: int, channels: int = 3, algo: str = "maml", ways: int = 3):
    cfg = config.load(
        None,
        [f"model.backbone={backbone}", f"algo.name={algo}", f"data.ways={ways}"],
    )
    return model_of(cfg.model, cfg.algo, (channels, side, side), ways)


def plain(backbone: str, side: int) -> torch.nn.Module:
    """The library's own network without its classifier, in training mode (BatchNorm on the
    batch's statistics), attention on its unfused path: what the references run."""
    if backbone == RESNET:
        net = torchvision.models.resnet18()
        net.fc = torch.nn.Identity()
    else:
        net = timm.create_model(backbone.partition(":")[2], num_classes=0, img_size=side)
        for m in net.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    return net.train()


def body_of(model) -> dict:
    return {k[4:]: v for k, v in model.state_dict().items() if k.startswith("net.")}


# ---- building and loading ----


def test_a_torchvision_file_with_its_classifier_and_statistics_loads_and_runs_as_the_library(
    tmp_path,
):
    """torchvision's own state dict (fc and BatchNorm running statistics included) starts the
    body; the features are the library network's on the batch's statistics, and a one-channel
    image is the library's on three equal channels."""
    torch.manual_seed(0)
    lib = torchvision.models.resnet18()
    torch.save(lib.state_dict(), tmp_path / "resnet18.pth")
    for channels in (3, 1):
        model = ours(RESNET, 32, channels)
        head = model.head.weight.detach().clone()
        kept = load_init(model, tmp_path / "resnet18.pth")
        assert kept == ["head.bias", "head.weight"]
        assert torch.equal(model.head.weight, head)
        for k, v in body_of(model).items():
            assert torch.equal(v, lib.state_dict()[k]), k
        assert not any(k.endswith("running_mean") for k in model.state_dict())
        x = torch.rand(4, channels, 32, 32)
        ref = plain(RESNET, 32)
        ref.load_state_dict(lib.state_dict(), strict=False)
        with torch.no_grad():
            assert torch.allclose(model.features(x), ref(x.expand(-1, 3, -1, -1)), atol=1e-5)
            # at test too (eval mode): the batch's statistics, never running ones
            assert torch.allclose(model.eval().features(x), ref(x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_a_timm_file_at_another_size_has_its_position_embedding_resized_as_timm_does(tmp_path):
    """A 224 px ViT's checkpoint (safetensors, and DINO's teacher/backbone container as .pth)
    into a 32 px network: the position embedding is timm's resampling of the file's, the other
    tensors the file's; the classifier and DINO's projection head are left out."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    full = timm.create_model("vit_tiny_patch16_224")
    sd = full.state_dict()
    save_file(sd, tmp_path / "vit.safetensors")
    dino = {
        "teacher": {
            **{f"backbone.{k}": v for k, v in sd.items()},
            "head.mlp.0.weight": sd["head.weight"],
        }
    }
    torch.save(dino, tmp_path / "dino.pth")
    want = resample_abs_pos_embed(sd["pos_embed"], (2, 2), num_prefix_tokens=1)
    for name in ("vit.safetensors", "dino.pth"):
        model = ours(VIT, 32)
        load_init(model, tmp_path / name)
        got = body_of(model)
        assert got["pos_embed"].shape == (1, 5, 192) and torch.allclose(got["pos_embed"], want)
        assert all(torch.equal(v, sd[k]) for k, v in got.items() if k != "pos_embed")


def test_a_file_that_does_not_fit_is_one_line_naming_the_first_mismatch(tmp_path):
    torch.manual_seed(0)
    sd = torchvision.models.resnet18().state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(
        WeightsError,
        match=r"'layer1.0.conv1.weight' is \(32, 64, 3, 3\) in the file; "
        r"torchvision:resnet18 at this image size expects \(64, 64, 3, 3\)",
    ):
        load_init(ours(RESNET, 32), tmp_path / "shape.pth")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(
        WeightsError, match=r"no tensor 'layer1.2.conv1.weight' \(\d+ of torchvision:resnet34"
    ):
        load_init(ours("torchvision:resnet34", 32), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"'conv1\.weight' is not in timm:vit_tiny_patch16_224"):
        load_init(ours(VIT, 32), tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a torch checkpoint"):
        load_init(ours(RESNET, 32), tmp_path / "junk.pth")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.backbone=timm:vit_nonexistent"],
            "timm has no classification network 'vit_nonexistent'",
        ),
        (["model.backbone=keras:resnet50"], "the library is torchvision or timm"),
        (["model.backbone=torchvision:vit_b_32", "data.image_size=32"], "no second derivative"),
        (["model.backbone=torchvision:resnet18", "algo.per_step_bn=true"], "algo.per_step_bn=true"),
        (["model.backbone=torchvision:squeezenet1_0"], "no linear classifier to replace"),
        (
            ["model.backbone=torchvision:vit_b_16", "algo.name=protonet", "data.image_size=20"],
            "does not run on 1x20x20",
        ),
        (["model.backbone=torchvision:resnet18", "algo.compile=on"], "runs one task at a time"),
    ],
)
def test_what_cannot_work_is_refused_at_start_in_one_line(
    omniglot_dir, tmp_path, overrides, message
):
    from metadist.errors import MetadistError
    from metadist.train import train

    cfg = config.load(
        None, small_overrides(omniglot_dir, tmp_path, **dict(o.split("=") for o in overrides))
    )
    with pytest.raises(MetadistError, match=message) as e:
        train(cfg, log=lambda *a, **k: None)
    assert "\n" not in str(e.value)


def test_timm_missing_is_one_line(omniglot_dir, tmp_path):
    """Without timm (a folder on PYTHONPATH whose `timm` fails to import, as a missing one
    does), a timm backbone is one line and exit status 2."""
    fake = tmp_path / "fake" / "timm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'timm'\")\n")
    import os

    env = dict(os.environ, PYTHONPATH=f"{fake.parent}{os.pathsep}{ROOT}")
    r = run_cli(
        "train", *small_overrides(omniglot_dir, tmp_path, **{"model.backbone": VIT}), env=env
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "timm is not installed" in r.stderr


# ---- the meta-gradient against a float64 reference ----


def reference_loss(net, params, b, steps, lr, first_order):
    """Mean over tasks of the query loss after `steps` SGD steps on the support, task by task,
    every weight adapted, the library's plain network through functional_call."""
    total = 0.0
    T = b["x_support"].shape[0]
    for t in range(T):
        fast = dict(params)
        for _ in range(steps):
            body = {k[4:]: v for k, v in fast.items() if k.startswith("net.")}
            f = functional_call(net, body, (b["x_support"][t],))
            loss = F.cross_entropy(
                F.linear(f, fast["head.weight"], fast["head.bias"]), b["y_support"][t]
            )
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
        body = {k[4:]: v for k, v in fast.items() if k.startswith("net.")}
        f = functional_call(net, body, (b["x_query"][t],))
        total = total + F.cross_entropy(
            F.linear(f, fast["head.weight"], fast["head.bias"]), b["y_query"][t]
        )
    return total / T


@pytest.mark.parametrize(("backbone", "side"), [(RESNET, 16), (VIT, 32)])
def test_the_meta_gradient_equals_a_per_task_float64_reference(float64, backbone, side):
    torch.manual_seed(0)
    model = ours(backbone, side).double()
    g = torch.Generator().manual_seed(1)
    T, ways = 2, 3
    b = {
        "x_support": torch.rand(T, ways, 3, side, side, generator=g),
        "y_support": torch.arange(ways).expand(T, -1),
        "x_query": torch.rand(T, 2 * ways, 3, side, side, generator=g),
        "y_query": torch.arange(ways).repeat(2).expand(T, -1),
    }
    net = plain(backbone, side).double()
    net.load_state_dict(body_of(model), strict=False)
    params = dict(model.named_parameters())
    for first_order in (False, True):
        inner = Inner(2, 0.1, first_order)
        model.zero_grad(set_to_none=True)
        loss, _ = meta_backward(
            lambda f, p, c, inner=inner: maml.task_losses(f, p, c, inner),
            Eager(model, not first_order, 0),
            params,
            b,
            1.0 / T,
        )
        got = torch.cat([p.grad.flatten() for p in params.values()])
        ref_loss = reference_loss(net, params, b, 2, 0.1, first_order)
        ref = torch.cat([g.flatten() for g in torch.autograd.grad(ref_loss, list(params.values()))])
        assert torch.allclose(loss / T, ref_loss, rtol=1e-10)
        assert torch.allclose(got, ref, rtol=1e-7, atol=1e-10), (got - ref).abs().max()
        if not first_order:
            second = ref
    assert (second - ref).abs().max() > 1e-4 * second.abs().max()  # really second order


# ---- exact mode and training ----


@pytest.mark.parametrize("backbone", [RESNET, VIT])
def test_exact_groups_give_the_same_bits_at_every_world_size(backbone):
    from tests.test_exact import eight_tasks, merged_over_ranks

    cfg = config.load(None, [f"model.backbone={backbone}", "train.meta_batch_size=8"])
    batch = eight_tasks()
    sums = {w: merged_over_ranks(cfg, batch, w, 4) for w in (1, 2)}
    assert sums[1].abs().sum() > 0 and torch.equal(sums[1], sums[2])


def test_the_pre_trained_route_runs_every_stage_on_a_library_network(omniglot_dir, tmp_path):
    """P>M>F's stages on a timm ViT: pre-training writes its backbone, ProtoNets meta-trains from
    it (model.init) and fine-tunes the whole network on each task's support at test
    (eval.finetune); each stage moves the weights it starts from. Then MAML on a torchvision
    ResNet-18 started from torchvision's own file."""
    from metadist.train import train

    small = {
        "model.backbone": VIT,
        "train.steps": 2,
        "train.meta_batch_size": 2,
        "train.val_every": 2,
        "train.checkpoint_every": 2,
        "data.test_episodes": 4,
        "eval.inner_steps": 2,
        "eval.val_inner_steps": 1,
        "eval.tasks_per_batch": 4,
    }
    lines = []
    said = lambda *a, **k: lines.append(" ".join(map(str, a)))
    pre = config.load(
        None, small_overrides(omniglot_dir, tmp_path / "pre", **small, **{"algo.name": "pretrain"})
    )
    train(pre, log=said)
    start = tmp_path / "pre" / "runs" / "t" / "backbone.safetensors"
    proto = config.load(
        None,
        small_overrides(
            omniglot_dir,
            tmp_path / "proto",
            **small,
            **{
                "algo.name": "protonet",
                "model.init": start,
                "eval.finetune": "true",
                "eval.inner_lr": 0.01,
            },
        ),
    )
    r = train(proto, log=said)
    assert any(f"model.init={start}: started from its tensors" in line for line in lines)
    assert 0 <= r["test_accuracy"] <= 1 and r["test_inner_steps"] == 2
    import metadist  # the Python interface adapts and predicts with the trained network

    task = metadist.load(tmp_path / "proto" / "runs" / "t").adapt(
        torch.rand(3, 1, 28, 28), [0, 1, 2]
    )
    assert task.predict(torch.rand(4, 1, 28, 28)).shape == (4,)
    began, ended = (
        load_weights(start)[0],
        load_weights(tmp_path / "proto" / "runs" / "t" / "model.safetensors")[0],
    )
    assert set(began) <= set(ended)
    assert any(not torch.equal(v, ended[k]) for k, v in began.items())

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    cfg = config.load(
        None,
        small_overrides(
            omniglot_dir,
            tmp_path / "maml",
            **dict(small, **{"model.backbone": RESNET, "model.init": tmp_path / "r18.pth"}),
        ),
    )
    train(cfg, log=said)
    ended = load_weights(tmp_path / "maml" / "runs" / "t" / "model.safetensors")[0]
    began = torchvision.models.resnet18().state_dict()
    moved = [
        k for k, v in ended.items() if k.startswith("net.") and not torch.equal(v, began[k[4:]])
    ]
    assert moved and all(k[4:] in began for k in ended if k.startswith("net."))


def test_evaluation_with_finetune_adapts_every_weight(small_cfg):
    """eval.finetune: ProtoNets' test-time loop takes eval.inner_steps on every weight at
    eval.inner_lr; without it, none (the prototypes alone)."""
    from metadist.algorithms import eval_inner

    cfg = small_cfg(**{"algo.name": "protonet", "eval.inner_steps": 7})
    model = model_for(cfg)
    assert eval_inner(cfg.algo, cfg.eval, model, 5).steps == 0
    cfg = small_cfg(
        **{
            "algo.name": "protonet",
            "eval.inner_steps": 7,
            "eval.finetune": "true",
            "eval.inner_lr": 0.01,
        }
    )
    inner = eval_inner(cfg.algo, cfg.eval, model, 5)
    assert (inner.steps, inner.lr, inner.adapt_names, inner.head_init) == (7, 0.01, None, "proto")


def test_no_subprocess_imports_timm_unasked():
    """Importing metadist (and building its own networks) does not import timm: an optional
    extra costs nothing to who does not use it."""
    code = "import metadist.train, metadist.models, sys; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_evaluation_keeps_no_step_of_the_inner_loop_alive(small_cfg):
    """Evaluation's adaptation (first order, no meta-gradient) builds no graph from one step to
    the next: each step's weights are plain tensors, so memory holds one step's weights, not
    eval.inner_steps of them (64 tasks x 10 steps of a ResNet-18's weights were 29 GB)."""
    from metadist.algorithms import eval_inner
    from metadist.algorithms.core import adapt, make_forward

    cfg = small_cfg(**{"algo.name": "protonet", "eval.finetune": "true", "eval.inner_steps": 3})
    model = model_for(cfg)
    inner = eval_inner(cfg.algo, cfg.eval, model, 5)
    T = 2
    fast = {k: v.detach().unsqueeze(0).expand(T, *v.shape) for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(T, 5, 1, 28, 28, generator=g)
    with torch.enable_grad():
        out = adapt(
            make_forward(model, second_order=False), fast, x, torch.arange(5).expand(T, -1), inner
        )
    assert all(v.grad_fn is None and not v.requires_grad for v in out.values())
    assert all(not torch.equal(out[k], fast[k]) for k in fast)  # every weight adapted


def test_eval_augment_fine_tunes_on_support_images_shifted_an_eighth_of_their_side(small_cfg):
    """eval.augment: step i's support loss is on the support moved by side/8 in SHIFTS[i]'s
    direction, the border repeated; one step equals plain adaptation on the shifted images."""
    from metadist.algorithms import eval_inner
    from metadist.algorithms.core import adapt, make_forward, shifted

    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 1, 16, 16)
    right = shifted(x, 0)  # (dy, dx) = (0, 1): content from 2 px to the right
    assert torch.equal(right[..., :, :14], x[..., :, 2:])
    assert torch.equal(right[..., :, 14:], x[..., :, 15:].expand(-1, -1, -1, -1, 2))
    assert torch.equal(shifted(x, 1)[..., :14, :], x[..., 2:, :])

    cfg = small_cfg(**{"eval.inner_steps": 1, "eval.augment": "true", "eval.finetune": "true"})
    model = model_for(cfg)
    inner = eval_inner(cfg.algo, cfg.eval, model, 5)
    assert inner.augment and inner.steps == 1
    fast = {k: v.detach().unsqueeze(0).expand(2, *v.shape) for k, v in model.named_parameters()}
    xs = torch.rand(2, 5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(5).expand(2, -1)
    forward = make_forward(model, second_order=False)
    with torch.enable_grad():
        got = adapt(forward, fast, xs, y, inner)
        plain = small_cfg(**{"eval.inner_steps": 1})
        plain_inner = eval_inner(plain.algo, plain.eval, model, 5)
        want = adapt(forward, fast, shifted(xs, 0), y, plain_inner)
        unshifted = adapt(forward, fast, xs, y, plain_inner)
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert not all(torch.equal(got[k], unshifted[k]) for k in got)


def test_eval_views_average_the_class_probabilities_of_moved_copies(small_cfg):
    """eval.views=3: each task predicted on its images as they are and moved a pixel (28 px side)
    in SHIFTS[0] and SHIFTS[1]'s directions, support and query alike; the prediction is the log
    of the three views' mean class probabilities. eval.views outside 1..9 is refused in one line."""
    from metadist import config
    from metadist.algorithms import eval_inner
    from metadist.algorithms.core import adapt_and_predict, shifted

    cfg = small_cfg(**{"algo.name": "protonet", "eval.views": 3})
    model = model_for(cfg)
    inner = eval_inner(cfg.algo, cfg.eval, model, 5)
    assert inner.views == 3
    plain = eval_inner(cfg.algo, small_cfg(**{"algo.name": "protonet"}).eval, model, 5)
    g = torch.Generator().manual_seed(0)
    batch = {
        "x_support": torch.rand(2, 5, 1, 28, 28, generator=g),
        "y_support": torch.arange(5).expand(2, -1),
        "x_query": torch.rand(2, 10, 1, 28, 28, generator=g),
        "y_query": torch.arange(5).repeat(2).expand(2, -1),
    }
    params = dict(model.named_parameters())
    with torch.no_grad():
        got = adapt_and_predict(model, params, batch, inner)
        moved = [
            dict(
                batch,
                x_support=shifted(batch["x_support"], i, 1),
                x_query=shifted(batch["x_query"], i, 1),
            )
            for i in range(2)
        ]
        each = [adapt_and_predict(model, params, b, plain) for b in (batch, *moved)]
    want = sum(v.softmax(-1) for v in each) / 3
    assert got.shape == (2, 10, 5)
    assert torch.equal(got, want.log())  # the same calls in the same order: the same bits
    assert not torch.allclose(each[0], each[1])  # the moved copies are other inputs
    assert torch.equal(shifted(batch["x_query"], 0, 1)[..., :27], batch["x_query"][..., 1:])
    for bad in ("0", "10"):
        with pytest.raises(config.ConfigError, match=r"eval\.views"):
            small_cfg(**{"eval.views": bad})
