"""The Python interface (metadist/api.py) and export (metadist/export.py), on a trained run and real
image files: docs/python.md's example runs; the same predictions as `metadist predict`; every form
of image gives the tensor the model sees; bad input is one clear line; each algorithm adapts its
own way; ONNX and torch.export give the classifier's logits within a float32 bound derived from
the classifier's own float32 error."""

import copy
import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metadist
from metadist import config
from metadist.algorithms import get, model_of
from metadist.api import APIError
from metadist.checkpoint import save_weights
from tests.conftest import run_cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def tasks(trained, tmp_path_factory):
    _, args, _ = trained
    out = tmp_path_factory.mktemp("api") / "tasks"
    r = run_cli("export-tasks", *args, "--split", "test", "--out", out, "--limit", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def task_files(tasks: Path, i: int) -> tuple[list, list]:
    sup = [tasks / "support" / f"{i:04d}" / f"image_{k}.png" for k in range(5)]
    qry = [tasks / "query" / f"{i:04d}" / f"image_{k}.png" for k in range(5)]
    return sup, qry


def test_the_docs_example_runs(trained, tasks, tmp_path, monkeypatch, capsys):
    tmp, _, _ = trained
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    code = code.replace('"runs/boss"', repr(str(tmp / "runs" / "t")))
    code = code.replace('f"tasks/', f'f"{tasks}/')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {})
    out = capsys.readouterr().out
    assert "tensor([" in out and "torch.Size([5, 5])" in out
    assert (tmp_path / "task.onnx").is_file()


def test_the_api_predicts_what_metadist_predict_writes(trained, tasks, tmp_path):
    tmp, _, _ = trained
    run = tmp / "runs" / "t"
    r = run_cli("predict", "--run", run, "--tasks", tasks, "--out", tmp_path / "out.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    written = [int(row[1]) for row in list(csv.reader(open(tmp_path / "out.csv")))[1:]]
    learner = metadist.load(run)
    files = [task_files(tasks, i) for i in range(8)]
    adapted = learner.adapt_many([(sup, range(5)) for sup, _ in files])
    logits = learner.logits_many(adapted, [learner.preprocess(q) for _, q in files])
    assert torch.cat([lg.argmax(-1) for lg in logits]).tolist() == written
    # one task alone predicts the same classes (tasks batched or not: the same maths)
    assert learner.adapt(files[3][0], range(5)).predict(files[3][1]).tolist() == written[15:20]


def test_images_in_every_form_give_the_tensor_the_model_sees(trained, tasks):
    tmp, _, _ = trained
    learner = metadist.load(tmp / "runs" / "t")
    paths, _ = task_files(tasks, 0)
    want = learner.preprocess(paths)  # (5, 1, 28, 28), as prepare writes it
    assert want.shape == (5, 1, 28, 28) and want.dtype == torch.float32
    pil = [Image.open(p) for p in paths]
    arrays = [np.asarray(im.convert("L")) for im in pil]
    forms = {
        "PIL": pil,
        "uint8 (H, W)": arrays,
        "uint8 (H, W, 1)": [a[..., None] for a in arrays],
        "tensor (1, H, W)": [torch.tensor(a)[None] for a in arrays],
        "float in [0, 1]": [a / 255.0 for a in arrays],
        "batch (n, H, W)": np.stack(arrays),
        "RGB PIL": [im.convert("RGB") for im in pil],
    }
    for name, images in forms.items():
        assert torch.equal(learner.preprocess(images), want), name
    # any size: resized as prepare resizes
    big = np.random.default_rng(0).integers(0, 256, (50, 70), dtype=np.uint8)
    assert learner.preprocess(big).shape == (1, 1, 28, 28)


def test_bad_input_raises_one_line_naming_it(trained, tasks, tmp_path):
    tmp, _, _ = trained
    learner = metadist.load(tmp / "runs" / "t")
    sup, _ = task_files(tasks, 0)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    cases = [
        ((sup, [0, 1, 2, 3, 5]), "class 4 has no support image"),
        ((sup, [-1, 0, 1, 2, 3]), "-1 is not a class"),
        ((sup, [0, 1, 2, 3]), "4 labels for 5 support images"),
        ((sup + sup[:1], [0, 1, 2, 3, 4, 5]), "learned head has 5 rows"),
        ((sup[:4] + [tmp_path / "bad.png"], range(5)), "cannot read image"),
        ((sup[:4] + [rgb], range(5)), "3 channels, this run's model takes 1"),
        ((sup[:4] + [np.full((28, 28), 2.0)], range(5)), "values outside 0..1"),
        ((sup, [0.5, 1, 2, 3, 4]), "give integer classes"),
    ]
    for (support, labels), said in cases:
        with pytest.raises(APIError, match=re.escape(said)) as e:
            learner.adapt(support, labels)
        assert "\n" not in str(e.value)
    # fewer classes than the learned head's rows: the task's own classes
    task = learner.adapt(sup[:3], [0, 1, 2])
    assert task.probabilities(sup).shape == (5, 3)


def weights_of(algo: str, omniglot_dir, tmp_path, **extra) -> Path:
    """A weights file of `algo` at its initialisation (adapting needs no training)."""
    overrides = [f"algo.name={algo}", "model.hidden=8", f"data.raw={omniglot_dir}"]
    cfg = config.load(None, overrides + [f"{k}={v}" for k, v in extra.items()])
    torch.manual_seed(0)
    rows = get(cfg.algo).head_rows(cfg.algo, 5, 20)  # pre-training: a row per training class
    model = model_of(cfg.model, cfg.algo, (1, 28, 28), rows)
    path = tmp_path / f"{algo}.safetensors"
    save_weights(model, path, cfg.to_dict(), 0)
    return path


@pytest.mark.parametrize("algo", ["maml", "anil", "protonet", "pretrain"])
def test_each_algorithm_adapts_its_own_way(algo, tasks, omniglot_dir, tmp_path):
    extra = {"algo.head_init": "zero"} if algo == "maml" else {}
    learner = metadist.load(weights_of(algo, omniglot_dir, tmp_path, **extra))
    sup, qry = task_files(tasks, 1)
    task = learner.adapt(sup, range(5))
    p = task.probabilities(qry)
    assert p.shape == (5, 5) and torch.allclose(p.sum(-1), torch.ones(5))
    meta = dict(learner.model.named_parameters())
    moved = {k for k, v in task.weights.items() if not torch.equal(v[0], meta[k].detach())}
    body = {k for k in moved if not k.startswith("head.")}
    if algo == "maml":  # every weight takes the inner steps
        assert body and {"head.weight", "head.bias"} <= moved
    elif algo == "anil":  # the head alone
        assert moved == {"head.weight", "head.bias"}
    else:  # ProtoNets and pre-training: prototypes (pre-training then adapts that head)
        assert not body and {"head.weight", "head.bias"} <= moved
    if algo == "protonet":  # the nearest prototype of the body's features
        c = learner.embed(sup)  # one image a class: the prototypes
        f = learner.embed(qry)
        assert torch.equal(task.predict(qry), torch.cdist(f, c).argmin(-1))


def ort_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def test_onnx_and_torch_export_give_the_classifiers_logits(trained, tasks, tmp_path):
    """The bound: the exported graph's float32 logits may be at most 8 times further from the
    classifier's float64 logits than the classifier's own float32 logits are, plus 64 eps."""
    tmp, _, _ = trained
    learner = metadist.load(tmp / "runs" / "t")
    sup, qry = task_files(tasks, 2)
    task = learner.adapt(sup, range(5))
    x = learner.preprocess(qry + sup)  # 10 images: the exported batch is free
    module = task.module()
    with torch.no_grad():
        f32 = module(x)
        f64 = copy.deepcopy(module).double()(x.double())
    own = (f32.double() - f64).abs().max().item()
    bound = 8 * own + 64 * EPS * f64.abs().max().item()
    assert torch.equal(f32.argmax(-1), task.logits(x).argmax(-1))
    onnx_path = task.export(tmp_path / "task.onnx")
    program = torch.export.load(task.export(tmp_path / "task.pt2")).module()
    with torch.no_grad():
        got = {"onnxruntime": ort_logits(onnx_path, x), "torch.export": program(x)}
    for name, y in got.items():
        assert y.shape == (10, 5), name
        assert (y.double() - f64).abs().max().item() <= bound, (name, own)
        assert torch.equal(y.argmax(-1), f32.argmax(-1)), name
    # the embedding network alone
    emb = learner.export_embedding(tmp_path / "embed.onnx")
    with torch.no_grad():
        e32 = learner.embed(qry)
        e64 = copy.deepcopy(learner.model).double().features(learner.preprocess(qry).double())
    own = (e32.double() - e64).abs().max().item()
    y = ort_logits(emb, learner.preprocess(qry))
    assert (y.double() - e64).abs().max().item() <= 8 * own + 64 * EPS * e64.abs().max().item()


def test_the_export_command_and_its_errors(trained, tasks, tmp_path, monkeypatch):
    tmp, _, _ = trained
    run = tmp / "runs" / "t"
    support = tmp_path / "mine"
    for k, path in enumerate(task_files(tasks, 4)[0]):
        (support / f"class_{k}").mkdir(parents=True)
        (support / f"class_{k}" / "a.png").write_bytes(path.read_bytes())
    r = run_cli("export", "--run", run, "--task", support, "--out", tmp_path / "t.pt2")
    assert r.returncode == 0 and "classifier of 5 classes (class_0," in r.stdout, r.stderr
    r = run_cli(
        "export", "--run", run, "--task", tasks / "support" / "0004", "--out", tmp_path / "u.onnx"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for extra, said in (
        ([], "give --task SUPPORT_DIR, or --embedding"),
        (["--task", tmp_path / "none"], "not a folder"),
        (["--task", support, "--out", tmp_path / "t.zip"], "one of .onnx, .pt2"),
    ):
        args = ["--out", tmp_path / "x.onnx", *extra] if "--out" not in extra else extra
        r = run_cli("export", "--run", run, *args)
        assert r.returncode == 2 and said in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    # without the export extra: one line saying what to install
    from metadist.export import ExportError

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    learner = metadist.load(run)
    with pytest.raises(ExportError, match=r"pip install 'metadist\[export\]'"):
        learner.adapt(task_files(tasks, 4)[0], range(5)).export(tmp_path / "v.onnx")
