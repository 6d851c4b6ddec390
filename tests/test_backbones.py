"""Backbones and heads in float64 against references written out here, one task at a time:
Conv4 and ResNet-12 (batched = loop = hand-unrolled, both orders, also with per-step BatchNorm
weights and learned rates); every algo.head_init for maml, fomaml and anil (both strategies, both
orders); ProtoNets' loss is the Euclidean prototypical loss; the pretrained start (model.init)."""

import pytest
import torch
import torch.nn.functional as F

from metadist.algorithms import maml
from metadist.algorithms.core import Inner, adapt_and_predict
from metadist.data.synthetic import random_batch
from metadist.models import InnerRates, is_lr, lr_key
from metadist.models.conv4 import ConvNet
from metadist.models.resnet12 import ResNet12
from metadist.step.compute import Eager, meta_backward

T, WAYS, SHOTS, QUERIES = 3, 3, 2, 2


@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test here computes in float64 (conftest's float64 fixture)."""


def make(backbone, learn_lr="none", steps=1, per_step_bn=False, rows=WAYS, seed=0):
    torch.manual_seed(seed)
    if backbone == "conv4":
        model = ConvNet(
            rows,
            hidden=4,
            depth=2,
            side=8,
            rates=InnerRates(learn_lr, steps=steps, per_step_bn=per_step_bn),
        )
    else:
        model = ResNet12(
            rows,
            widths=(3, 4, 4, 5),
            in_channels=3,
            side=16,
            rates=InnerRates(learn_lr, steps=steps, per_step_bn=per_step_bn),
        )
    model = model.double()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters and rates
        for n, p in model.named_parameters():
            if model.is_norm(n) or is_lr(n):
                p.add_(0.3 * torch.randn_like(p) * (0.3 if is_lr(n) else 1.0))
    return model


def batch(backbone, seed=1):
    c, side = (1, 8) if backbone == "conv4" else (3, 16)
    return random_batch(T, WAYS, SHOTS, QUERIES, (c, side, side), seed)


def bn(x, p, name, step):
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    g, b = p[name + ".weight"], p[name + ".bias"]
    if g.dim() == 2:
        g, b = g[min(step, g.shape[0] - 1)], b[min(step, b.shape[0] - 1)]
    return (x - mean) / torch.sqrt(var + 1e-5) * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def body(backbone, p, x, step=0):
    """The features, written out independently of metadist/models."""
    if backbone == "conv4":
        for i in range(2):
            x = F.max_pool2d(
                F.relu(
                    bn(
                        F.conv2d(x, p[f"blocks.{i}.conv.weight"], padding=1),
                        p,
                        f"blocks.{i}.norm",
                        step,
                    )
                ),
                2,
            )
        return x.flatten(1)
    for i in range(4):
        q = f"blocks.{i}."
        out = F.leaky_relu(
            bn(F.conv2d(x, p[q + "conv1.weight"], padding=1), p, q + "bn1", step), 0.1
        )
        out = F.leaky_relu(
            bn(F.conv2d(out, p[q + "conv2.weight"], padding=1), p, q + "bn2", step), 0.1
        )
        out = bn(F.conv2d(out, p[q + "conv3.weight"], padding=1), p, q + "bn3", step)
        short = bn(F.conv2d(x, p[q + "shortcut.weight"]), p, q + "bn_sc", step)
        x = F.max_pool2d(F.leaky_relu(out + short, 0.1), 2)
    return x.mean((2, 3))


def per_task(b):
    """A batch of fixed episodes as the reference's list of tasks."""
    return [{k: v[t] for k, v in b.items()} for t in range(b["x_support"].shape[0])]


def reference_loss(
    backbone, model, params, tasks, steps, lr, first_order, head_init="learned", frozen=()
):
    """The exercise's loop, one task at a time (`tasks`: each its own unpadded episode, its own
    number of classes and shots), with the head each task starts from."""
    losses = [
        F.cross_entropy(
            reference_logits(backbone, params, b, steps, lr, first_order, head_init, frozen),
            b["y_query"],
        )
        for b in tasks
    ]
    return torch.stack(losses).mean()


def reference_logits(backbone, params, b, steps, lr, first_order, head_init="learned", frozen=()):
    """One task's query logits after its inner loop."""
    lrs = {k: params.get(lr_key(k), lr) for k in params if not is_lr(k)}

    def rate(k, i):
        r = lrs[k]
        return (
            r[min(i, r.shape[0] - 1)]
            if isinstance(r, torch.Tensor) and r.dim() == params[k].dim() + 1
            else r
        )

    fast = {k: v for k, v in params.items() if not is_lr(k)}
    ways = int(b["y_support"].max()) + 1
    if head_init == "zero":
        fast["head.weight"] = torch.zeros(ways, fast["head.weight"].shape[1], requires_grad=True)
        fast["head.bias"] = torch.zeros(ways, requires_grad=True)
    elif head_init == "shared":
        fast["head.weight"] = fast["head.weight"].expand(ways, -1)
        fast["head.bias"] = fast["head.bias"].expand(ways)
    elif head_init == "proto":
        f = body(backbone, fast, b["x_support"], 0)
        c = torch.stack([f[b["y_support"] == k].mean(0) for k in range(ways)])
        fast["head.weight"], fast["head.bias"] = 2 * c, -(c * c).sum(1)
    for i in range(steps):
        names = [k for k in fast if k not in frozen]
        ws = [
            fast[k] if fast[k].requires_grad else fast[k].detach().requires_grad_() for k in names
        ]
        fast = dict(fast, **dict(zip(names, ws)))
        # first order: the inner gradient is a constant (taken on detached copies)
        wrt = [w.detach().requires_grad_() for w in ws] if first_order else ws
        cur = dict(fast, **dict(zip(names, wrt)))
        logits = F.linear(
            body(backbone, cur, b["x_support"], i), cur["head.weight"], cur["head.bias"]
        )
        grads = list(
            torch.autograd.grad(
                F.cross_entropy(logits, b["y_support"]), wrt, create_graph=not first_order
            )
        )
        if head_init == "proto" and i == 0 and not first_order and len(names) > 2:
            # the inner step treats the head as a parameter of its own: take out of the body's
            # gradient the part that runs back through the prototypes (a partial derivative)
            heads = [names.index("head.weight"), names.index("head.bias")]
            body_at = [j for j in range(len(names)) if j not in heads]
            through = torch.autograd.grad(
                [wrt[j] for j in heads],
                [wrt[j] for j in body_at],
                [grads[j] for j in heads],
                create_graph=True,
                allow_unused=True,
            )
            for j, g in zip(body_at, through):
                if g is not None:
                    grads[j] = grads[j] - g
        fast = dict(fast, **{k: fast[k] - rate(k, i) * g for k, g in zip(names, grads)})
    return F.linear(
        body(backbone, fast, b["x_query"], max(0, steps - 1)),
        fast["head.weight"],
        fast["head.bias"],
    )


def ours(model, b, inner, strategy):
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    second = inner.steps > 0 and not inner.first_order
    loss, _ = meta_backward(
        lambda f, p, c: maml.task_losses(f, p, c, inner),
        Eager(model, second, 1 if strategy == "loop" else 0),
        params,
        b,
        1.0 / T,
    )
    return loss / T, torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params.values()]
    )


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).flatten()
            for g, p in zip(grads, params.values())
        ]
    )


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("learn_lr, per_step_bn", [("none", False), ("layer_step", True)])
def test_backbone_batched_and_loop_equal_the_hand_unrolled_reference(
    backbone, first_order, learn_lr, per_step_bn
):
    steps = 2
    model, b = make(backbone, learn_lr, steps, per_step_bn), batch(backbone)
    params = dict(model.named_parameters())
    frozen = tuple(k for k in params if model.is_norm(k)) if per_step_bn else ()
    ref_loss = reference_loss(
        backbone, model, params, per_task(b), steps, 0.4, first_order, frozen=frozen
    )
    ref = flat_grad(ref_loss, params)
    names = tuple(k for k in params if not is_lr(k) and k not in frozen) if per_step_bn else None
    for strategy in ("batched", "loop"):
        loss, g = ours(model, b, Inner(steps, 0.4, first_order, names), strategy)
        assert torch.allclose(loss, ref_loss, rtol=1e-10), strategy
        assert torch.allclose(g, ref, rtol=1e-7, atol=1e-10), strategy
    if not first_order:  # really second order: the first-order gradient differs
        fo = flat_grad(
            reference_loss(backbone, model, params, per_task(b), steps, 0.4, True, frozen=frozen),
            params,
        )
        assert (fo - ref).abs().max() > 1e-4 * ref.abs().max()


@pytest.mark.parametrize("head_init", ["zero", "shared", "proto"])
@pytest.mark.parametrize("algo", ["maml", "fomaml", "anil"])
def test_every_head_init_equals_the_per_task_reference(head_init, algo):
    model = make("conv4", rows=1 if head_init == "shared" else WAYS)
    b = batch("conv4")
    params = dict(model.named_parameters())
    first_order = algo == "fomaml"
    frozen = tuple(k for k in params if not k.startswith("head.")) if algo == "anil" else ()
    ref_loss = reference_loss(
        "conv4", model, params, per_task(b), 2, 0.4, first_order, head_init, frozen
    )
    ref = flat_grad(ref_loss, params)
    names = model.head_names() if algo == "anil" else None
    for strategy in ("batched", "loop"):
        loss, g = ours(
            model, b, Inner(2, 0.4, first_order, names, head_init=head_init, ways=WAYS), strategy
        )
        assert torch.allclose(loss, ref_loss, rtol=1e-10), strategy
        assert torch.allclose(g, ref, rtol=1e-7, atol=1e-10), strategy
    head = torch.cat(
        [torch.zeros(1)]
        + [
            params[k].grad.flatten()
            for k in ("head.weight", "head.bias")
            if params[k].grad is not None
        ]
    )
    if head_init == "shared":
        assert head.abs().max() > 0  # the shared row is meta-learned
    else:
        # zero and proto heads are not meta-parameters
        assert head.abs().max() == 0
    # evaluation starts from the same head: 0 steps with the proto head is nearest-prototype
    if head_init == "proto":
        logits = adapt_and_predict(
            model,
            params,
            b,
            Inner(0, 0.4, True, names, head_init="proto", ways=WAYS),
        )
        for t in range(T):
            f = body("conv4", {k: v.detach() for k, v in params.items()}, b["x_support"][t])
            c = torch.stack([f[b["y_support"][t] == k].mean(0) for k in range(WAYS)])
            q = body("conv4", {k: v.detach() for k, v in params.items()}, b["x_query"][t])
            assert torch.equal(logits[t].argmax(-1), (-(torch.cdist(q, c) ** 2)).argmax(-1))


def test_shared_head_outcome_does_not_depend_on_how_classes_are_numbered():
    """UNICORN-MAML's point: permuting a task's class labels permutes its predictions, nothing
    else."""
    model, b = make("conv4", rows=1), batch("conv4")
    params = dict(model.named_parameters())
    inner = Inner(2, 0.4, True, head_init="shared", ways=WAYS)
    perm = torch.tensor([2, 0, 1])
    a = adapt_and_predict(
        model,
        params,
        b,
        inner,
    )
    relabelled = adapt_and_predict(
        model,
        params,
        {**b, "y_support": perm[b["y_support"]]},
        inner,
    )
    # column perm[c] holds class c
    assert torch.allclose(relabelled[..., perm], a, rtol=1e-9, atol=1e-12)
    learned = make("conv4")
    inner = Inner(2, 0.4, True, ways=WAYS)
    p = dict(learned.named_parameters())
    x = adapt_and_predict(
        learned,
        p,
        b,
        inner,
    )
    y = adapt_and_predict(
        learned,
        p,
        {**b, "y_support": perm[b["y_support"]]},
        inner,
    )
    # the learned head's outcome does depend on it
    assert not torch.allclose(y[..., perm], x, rtol=1e-6)


def test_protonet_loss_is_the_euclidean_prototypical_loss():
    from metadist import config
    from metadist.algorithms import build

    model, b = make("resnet12"), batch("resnet12")
    cfg = config.load(None, ["algo.name=protonet", f"data.ways={WAYS}"])
    algo = build(cfg.algo, model, WAYS)
    assert (
        algo.train_inner.steps == 0
        and algo.train_inner.head_init == "proto"
        and algo.test_inner(10, 0.4).steps == 0
    )
    params = dict(model.named_parameters())
    loss, g = ours(model, b, algo.train_inner, "batched")
    ref = []
    for t in range(T):
        f = body("resnet12", params, b["x_support"][t])
        c = torch.stack([f[b["y_support"][t] == k].mean(0) for k in range(WAYS)])
        q = body("resnet12", params, b["x_query"][t])
        ref.append(F.cross_entropy(-((q[:, None] - c[None]) ** 2).sum(-1), b["y_query"][t]))
    ref_loss = torch.stack(ref).mean()
    assert torch.allclose(loss, ref_loss, rtol=1e-10)
    assert torch.allclose(g, flat_grad(ref_loss, params), rtol=1e-7, atol=1e-10)


def test_model_init_names_what_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    from metadist.checkpoint import WeightsError, backbone_weights, load_init

    src, dst = make("conv4", rows=7, seed=3).float(), make("conv4", learn_lr="layer").float()
    save_file(backbone_weights(src), str(tmp_path / "body.safetensors"))
    kept = load_init(dst, tmp_path / "body.safetensors")
    assert set(kept) == {"head.weight", "head.bias"} | {
        k for k, _ in dst.named_parameters() if is_lr(k)
    }
    assert torch.equal(
        dst.get_parameter("blocks.1.conv.weight"), src.get_parameter("blocks.1.conv.weight")
    )
    wide = ConvNet(3, hidden=6, depth=2, side=8)
    save_file(
        {**wide.state_dict(), "extra.weight": torch.zeros(2)}, str(tmp_path / "wide.safetensors")
    )
    with pytest.raises(WeightsError) as e:
        load_init(dst, tmp_path / "wide.safetensors")
    assert "not in the model: extra.weight" in str(
        e.value
    ) and "blocks.0.conv.weight (6, 1, 3, 3) (the model's (4, 1, 3, 3))" in str(e.value)
    with pytest.raises(WeightsError, match="no such weights file"):
        load_init(dst, tmp_path / "missing.safetensors")


# ---- variable episodes: padded, masked batches against each task's own unpadded episode ----


def variable_tasks(backbone, seed=2):
    """Three episodes of Meta-Dataset's sampler (small constants) from a random pool: the padded
    batch training sees (stream.pad_batch) and each episode on its own, unpadded."""
    from types import SimpleNamespace

    import numpy as np

    from metadist.data.episodes import episode_rng, sample_variable_episode, to_float
    from metadist.data.split import pad_batch

    c, side = (1, 8) if backbone == "conv4" else (3, 16)
    g = np.random.default_rng(seed)
    sizes = g.integers(2, 9, size=8)
    pool = g.integers(0, 256, size=(int(sizes.sum()), c, side, side), dtype=np.uint8)
    first = np.concatenate([[0], np.cumsum(sizes)])

    def gather(rows):
        return np.stack([np.rot90(pool[first[a] + m], k, axes=(-2, -1)) for a, m, k in rows])

    v = SimpleNamespace(
        min_ways=2,
        max_ways=4,
        max_query=3,
        max_support=12,
        max_support_per_class=4,
        min_log_weight=-0.7,
        max_log_weight=0.7,
    )
    records = [
        sample_variable_episode(sizes.tolist(), [0, 1, 2, 3], v, episode_rng(seed, "train", i))
        for i in range(T)
    ]
    tasks = []
    for r in records:
        task = {}
        for name, part in (("support", 0), ("query", 1)):
            rows = r[r[:, 4] == part]
            task[f"x_{name}"] = to_float(torch.from_numpy(gather(rows[:, :3]))).double()
            task[f"y_{name}"] = torch.from_numpy(rows[:, 3]).long()
        tasks.append(task)
    padded = pad_batch(records, gather)
    padded = {k: v.double() if v.is_floating_point() else v for k, v in padded.items()}
    # the three episodes differ in ways and in support size, so padding and masking matter
    assert len({int(t["y_support"].max()) for t in tasks}) > 1
    assert len({len(t["y_support"]) for t in tasks}) > 1
    return padded, tasks


@pytest.mark.parametrize(
    "backbone, algo, head_init",
    [
        ("conv4", "maml", "zero"),
        ("conv4", "maml", "shared"),
        ("conv4", "maml", "proto"),
        ("conv4", "fomaml", "zero"),
        ("conv4", "fomaml", "proto"),
        ("conv4", "anil", "proto"),
        ("conv4", "protonet", "proto"),
        ("resnet12", "maml", "proto"),
        ("resnet12", "protonet", "proto"),
    ],
)
def test_padded_variable_episodes_equal_each_unpadded_task(backbone, algo, head_init):
    """Padding changes nothing: loss and meta-gradient of a padded batch of variable episodes
    (batched and loop) equal the per-task float64 reference on each task's own episode; and
    evaluation's predictions for the real query rows equal the reference's."""
    model = make(backbone, rows=1 if head_init == "shared" else 4)
    b, tasks = variable_tasks(backbone)
    params = dict(model.named_parameters())
    steps = 0 if algo == "protonet" else 2
    first_order = algo == "fomaml"
    frozen = tuple(k for k in params if not k.startswith("head.")) if algo == "anil" else ()
    ref_loss = reference_loss(
        backbone, model, params, tasks, steps, 0.4, first_order, head_init, frozen
    )
    ref = flat_grad(ref_loss, params)
    names = model.head_names() if algo == "anil" else None
    inner = Inner(steps, 0.4, first_order, names, head_init=head_init)
    for strategy in ("batched", "loop"):
        loss, g = ours(model, b, inner, strategy)
        assert torch.allclose(loss, ref_loss, rtol=1e-10), strategy
        assert torch.allclose(g, ref, rtol=1e-7, atol=1e-10), strategy
        logits = adapt_and_predict(model, params, b, inner, strategy == "loop")
        for t, task in enumerate(tasks):
            ways, n = int(task["y_support"].max()) + 1, len(task["y_query"])
            detached = {k: v.detach() for k, v in params.items()}
            want = reference_logits(backbone, detached, task, steps, 0.4, True, head_init, frozen)
            assert torch.allclose(logits[t, :n, :ways], want, rtol=1e-8, atol=1e-10), strategy
            assert (logits[t, :n, ways:] < -1e3).all()  # classes the task does not have
