"""`make bench-adapt`: how long using a learner takes (metadist.load -> adapt -> predict), per
algorithm (maml, anil, protonet, pretrain) and backbone (Conv4 at 28x28 grey, Conv4 at 84x84 RGB,
ResNet-12 at 84x84 RGB), on this CPU: milliseconds to adapt to one 5-way 1-shot task (one task
alone, and per task with `--tasks` tasks adapted together), and to predict one query image (the
task's 75 queries at once, eager, and the exported classifier under onnxruntime). The networks are
at their initialisation (the time does not depend on what was learned); adapting takes the run's
test settings (eval.inner_steps=10 for MAML and ANIL; pre-training adapts its head 10 steps).

  python bench/adapt_latency.py [--tasks 64] [--repeats 3] [--only conv4-28,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKBONES = {
    "conv4-28": ["model.backbone=conv4", "data.image_size=28", "data.channels=1"],
    "conv4-84": [
        "model.backbone=conv4",
        "model.hidden=32",
        "data.image_size=84",
        "data.channels=3",
        "data.source=folder",
    ],
    "resnet12-84": [
        "model.backbone=resnet12",
        "data.image_size=84",
        "data.channels=3",
        "data.source=folder",
    ],
}
ALGOS = ("maml", "anil", "protonet", "pretrain")


def learner_for(algo: str, backbone: str, folder: Path, device: str = "cpu"):
    import metadist
    from metadist import config
    from metadist.algorithms import get, model_of
    from metadist.checkpoint import save_weights

    cfg = config.load(None, [f"algo.name={algo}", "data.queries=15", *BACKBONES[backbone]])
    d = cfg.data
    torch.manual_seed(0)
    rows = get(cfg.algo).head_rows(cfg.algo, d.ways, 64)
    model = model_of(cfg.model, cfg.algo, (d.channels, d.image_size, d.image_size), rows)
    path = folder / f"{algo}-{backbone}.safetensors"
    save_weights(model, path, cfg.to_dict(), 0)
    return metadist.load(path, device=device), cfg


def images(cfg, n: int, seed: int) -> np.ndarray:
    d = cfg.data
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, d.image_size, d.image_size, d.channels), dtype=np.uint8)


def ms(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def row(algo: str, backbone: str, tasks: int, repeats: int, folder: Path, device: str) -> dict:
    import onnxruntime

    learner, cfg = learner_for(algo, backbone, folder, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    support, query = images(cfg, 5, 0), images(cfg, 75, 1)
    labels = list(range(5))
    out = {"adapt_1": ms(lambda: (learner.adapt(support, labels), sync()), repeats)}
    many = [(images(cfg, 5, 10 + i), labels) for i in range(tasks)]
    out["adapt_many"] = ms(lambda: (learner.adapt_many(many), sync()), max(1, repeats // 2)) / tasks
    task = learner.adapt(support, labels)
    x = learner.preprocess(query)
    out["predict"] = ms(lambda: (task.logits(x), sync()), repeats) / len(query)
    path = task.export(folder / f"{algo}-{backbone}.onnx", queries=len(query))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, xn = session.get_inputs()[0].name, x.cpu().numpy()
    out["predict_onnx"] = ms(lambda: session.run(None, {name: xn}), repeats) / len(query)
    return out


def main():
    from bench.bench import machine as machine_line

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated backbones")
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--device", default="cpu", help="where the learner adapts (onnxruntime: CPU)")
    args = p.parse_args()
    print(machine_line(torch.device(args.device)), time.strftime("%Y-%m-%d"))
    print(
        f"{'algorithm':<9} {'backbone':<12} {'adapt 1 task':>13} {f'per task of {args.tasks}':>15} "
        f"{'predict/img':>12} {'onnxruntime':>12}   (ms)"
    )
    chosen = args.only.split(",") if args.only else list(BACKBONES)
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in chosen:
            for algo in args.algos.split(","):
                r = row(algo, backbone, args.tasks, args.repeats, Path(tmp), args.device)
                print(
                    f"{algo:<9} {backbone:<12} {r['adapt_1']:>13.1f} {r['adapt_many']:>15.1f} "
                    f"{r['predict']:>12.3f} {r['predict_onnx']:>12.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
