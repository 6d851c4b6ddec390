"""Meta-training, readable top to bottom: one process's share of every global meta-batch,
meta-gradients averaged across ranks, Adam on the meta-parameters, validation, checkpoints.

Run folder <run.root>/<run.name>: config.yaml, metrics.jsonl, checkpoints/, best.safetensors,
model.safetensors, summary.json (and W&B's offline files). Launching again on an existing run
folder resumes from its latest complete checkpoint (run.fresh=true starts over).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from metadist import config as config_mod
from metadist.algorithms import build as build_algorithm
from metadist.algorithms.core import meta_backward
from metadist.checkpoint import Checkpointer, load_weights, save_weights
from metadist.config import Config, ConfigError
from metadist.cuda_graph import GraphedStep
from metadist.data.prepare import prepare, shards_dir
from metadist.data.shards import EpisodeSource, meta_batches
from metadist.distributed import Dist
from metadist.evaluate import build_model, ci95, episode_accuracies
from metadist.tracking import make_tracker


class TrainError(RuntimeError):
    pass


def resolve_strategy(strategy: str, device: torch.device, images_per_task: int, second_order: bool) -> str:
    """auto: batched on GPU (the per-task loop is launch-bound there). On CPU (`make bench`):
    batched wins for 5-way 1-shot in both orders and for 20-way first order; for 20-way second
    order the folded first layer outgrows the caches and the per-task loop is faster."""
    if strategy != "auto":
        return strategy
    if device.type == "cuda":
        return "batched"
    return "loop" if second_order and images_per_task > 10 else "batched"


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "cosine":
            span = max(1, t.steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - t.warmup_steps) / span)))
        return 1.0
    return f


def check_finite(step: int, loss: torch.Tensor, model: torch.nn.Module) -> None:
    if not torch.isfinite(loss).all():
        raise TrainError(f"step {step}: non-finite meta-loss {loss.item()}")
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise TrainError(f"step {step}: non-finite meta-gradient in {name}")


@contextlib.contextmanager
def anomaly_guard(step: int, debug: bool):
    """In debug mode, anomaly detection's error (naming the backward function that produced a
    non-finite value) becomes a TrainError naming the step."""
    try:
        yield
    except RuntimeError as e:
        if not debug:
            raise
        raise TrainError(f"step {step}: non-finite value in the meta-backward: {str(e).splitlines()[0]}") from None


def cross_check(algo, model, params, batch, chunk: int, scale: float, tol: float = 1e-4) -> float:
    """Debug: the batched strategy's meta-gradient against the per-task loop's, same batch."""
    grads = []
    for strategy in ("batched", "loop"):
        model.zero_grad(set_to_none=True)
        meta_backward(algo.task_losses, model, params, batch, strategy, chunk, scale, algo.second_order)
        grads.append(torch.cat([p.grad.flatten() for p in params.values()]))
    model.zero_grad(set_to_none=True)
    err = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max().clamp_min(1e-12)).item()
    if err > tol:
        raise TrainError(f"debug cross-check: batched and loop meta-gradients differ by {err:.2e} (relative), over {tol}")
    return err


def train(cfg: Config, log=print) -> dict:
    dist = Dist()
    try:
        return _train(cfg, dist, log)
    finally:
        dist.close()


def _train(cfg: Config, dist: Dist, log) -> dict:
    t, d = cfg.train, cfg.data
    local_tasks = config_mod.shares(t.meta_batch_size, dist.world)
    say = log if dist.is_main else (lambda *a, **k: None)
    if t.debug:
        if dist.world > 1:
            raise ConfigError("train.debug runs a single process on one device; launch it without accelerate")
        torch.autograd.set_detect_anomaly(True)
        torch.use_deterministic_algorithms(True)
    run_dir = Path(cfg.run.root) / cfg.run.name
    if dist.is_main:
        if cfg.run.fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
        prepare(cfg, log=say)
    dist.barrier()

    shards = shards_dir(cfg)
    device = dist.device
    dist.seed(cfg.seed)
    model = build_model(cfg).to(device)
    params = dict(model.named_parameters())
    algorithms = {fo: build_algorithm(cfg, model, 0 if fo else None) for fo in (True, False)}
    strategy = resolve_strategy(cfg.algo.strategy, device, d.ways * (d.shots + d.queries),
                                algorithms[False].second_order)
    opt = torch.optim.Adam(model.parameters(), lr=t.meta_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpt = Checkpointer(run_dir, t.checkpoint_every, t.keep_checkpoints, dist.is_main)
    state = {"step": 0, "best_val": -1.0, "best_step": 0, "elapsed": 0.0, "tasks_seen": 0}
    latest = None if cfg.run.fresh else ckpt.latest()
    if latest is not None:
        weights, opt_state, meta = Checkpointer.load(latest)
        model.load_state_dict(weights)
        opt.load_state_dict(opt_state["optimizer"])
        sched.load_state_dict(opt_state["scheduler"])
        state.update({k: meta[k] for k in state})
        if dist.is_main and (run_dir / "metrics.jsonl").exists():   # drop records past the checkpoint
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= state["step"]]
            (run_dir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
        say(f"resuming {run_dir} from {latest.name} (written by {meta['world_size']} process(es), now {dist.world})")
    elif dist.is_main and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()   # a run that never checkpointed starts over
    if state["step"] >= t.steps:
        say(f"{run_dir}: already trained {state['step']} of {t.steps} steps")
    tracker = make_tracker(cfg, run_dir, dist.is_main)
    val_set = EpisodeSource(shards / "val").all()
    gather = dist.gather_rows

    def validate() -> float:
        accs = episode_accuracies(model, cfg, val_set, cfg.eval.val_inner_steps, device, strategy, dist.rank, dist.world, gather)
        return accs.mean().item()

    def checkpoint_state():
        meta = dict(state, world_size=dist.world, meta_batch_size=t.meta_batch_size, seed=cfg.seed,
                    data_position=state["step"] * t.meta_batch_size, metadist_config=cfg.to_dict())
        return model, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, meta, \
            weights_meta(cfg, state["step"])

    # cache_enabled=False: autocast's weight cache cannot live across CUDA-graph replays
    amp = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
           if t.mixed_precision == "bf16" and device.type == "cuda" else contextlib.nullcontext())
    if t.cuda_graph == "on" and device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=on needs a CUDA device (this process runs on {device})")
    use_graph = device.type == "cuda" and not t.debug and t.cuda_graph != "off"
    param_list = list(params.values())

    def meta_step_of(a):
        return lambda b: meta_backward(a.task_losses, model, params, b, strategy, cfg.algo.tasks_per_chunk,
                                       1.0 / local_tasks, a.second_order)
    # keyed like `algorithms` (first order or not: derivative-order annealing switches between them)
    meta_steps = {fo: meta_step_of(a) for fo, a in algorithms.items()}
    graphs = {}     # the captured meta-step of each key, on CUDA
    stream = meta_batches(shards / "train", cfg.seed, t.meta_batch_size, dist.rank, dist.world, state["step"], t.steps,
                          d.task_aug, d.num_workers)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if dist.is_main else None
    bar = tqdm(total=t.steps, initial=state["step"], disable=not dist.is_main, dynamic_ncols=True, file=sys.stderr)
    algo = algorithms[False]
    if cfg.algo.first_order_steps and algo.second_order:
        say(f"derivative-order annealing: steps 1..{cfg.algo.first_order_steps} first order, then second order")
    say(f"training {cfg.algo.name} ({strategy}) on {dist.world} process(es), {device}: {t.meta_batch_size} tasks/step "
        f"({local_tasks} per process), steps {state['step']}..{t.steps}")
    window = {"loss": 0.0, "acc": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}
    start_wall, start_elapsed = time.perf_counter(), state["elapsed"]
    state["start_step"] = state["step"]
    stop_early = False
    for batch in stream:
        step = batch.pop("step")
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        key = step < cfg.algo.first_order_steps
        algo = algorithms[key]
        with anomaly_guard(step + 1, t.debug):
            if t.debug and step == 0:
                err = cross_check(algo, model, params, batch, cfg.algo.tasks_per_chunk, 1.0 / local_tasks)
                say(f"debug: batched vs loop meta-gradient agree (max relative difference {err:.1e})")
            with amp:
                if use_graph:        # the graph overwrites .grad on every replay: no zeroing
                    if key not in graphs:
                        graphs[key] = GraphedStep(meta_steps[key], param_list, batch)
                    loss_sum, acc_sum = graphs[key](batch)
                else:
                    opt.zero_grad(set_to_none=True)
                    loss_sum, acc_sum = meta_steps[key](batch)
        dist.mean_gradients(param_list)
        if t.debug:
            check_finite(step + 1, loss_sum, model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        opt.step()
        sched.step()
        state["step"] = step + 1
        state["tasks_seen"] += t.meta_batch_size
        window["loss"] = window["loss"] + loss_sum
        window["acc"] = window["acc"] + acc_sum
        window["n"] += local_tasks
        window["steps"] += 1
        state["elapsed"] = start_elapsed + time.perf_counter() - start_wall
        last = state["step"] == t.steps
        if t.max_minutes:   # rank 0's clock decides, so every rank stops at the same step
            stop_early = dist.broadcast_object(state["elapsed"] >= 60 * t.max_minutes)
            last = last or stop_early
        record = {}
        if state["step"] % t.log_every == 0 or last:
            sums = dist.sum(torch.stack([torch.as_tensor(window["loss"], device=device, dtype=torch.float32),
                                         torch.as_tensor(window["acc"], device=device, dtype=torch.float32),
                                         torch.tensor(float(window["n"]), device=device)]))
            dt = time.perf_counter() - window["t0"]
            if not math.isfinite(sums[0].item()):
                raise TrainError(f"step {state['step']}: non-finite meta-loss")
            record = {"step": state["step"], "loss": sums[0].item() / sums[2].item(), "accuracy": sums[1].item() / sums[2].item(),
                      "tasks_per_s": window["steps"] * t.meta_batch_size / dt, "lr": sched.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "elapsed_s": state["elapsed"]}
            if device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            window = {"loss": 0.0, "acc": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}", tps=f"{record['tasks_per_s']:.0f}")
        if state["step"] % t.val_every == 0 or last:
            v = validate()
            record = dict(record or {"step": state["step"], "elapsed_s": state["elapsed"]}, val_accuracy=v)
            if v > state["best_val"]:
                state.update(best_val=v, best_step=state["step"])
                if dist.is_main:
                    save_weights(model, run_dir / "best.safetensors", weights_meta(cfg, state["step"], v))
            if dist.is_main:
                bar.write(f"step {state['step']}: val accuracy {v:.4f} (best {state['best_val']:.4f} at step {state['best_step']})")
        if record:
            if dist.is_main:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            tracker.log({k: v for k, v in record.items() if k != "step"}, record["step"])
        if ckpt.maybe_save(state["step"], last, checkpoint_state):
            dist.barrier()   # no rank runs ahead of a checkpoint being written
        bar.update(1)
        if stop_early:
            say(f"train.max_minutes={t.max_minutes} reached at step {state['step']}")
            break
    bar.close()
    if metrics_file:
        metrics_file.close()
    return finish(cfg, dist, model, run_dir, state, tracker, shards, strategy, say)


def weights_meta(cfg: Config, step: int, val: float | None = None) -> dict:
    return {"config": cfg.to_dict(), "step": step, "val_accuracy": val, "format": "metadist-convnet-1"}


def finish(cfg, dist, model, run_dir, state, tracker, shards, strategy, say) -> dict:
    """Final weights, the best weights' test accuracy, summary.json."""
    if dist.is_main:
        save_weights(model, run_dir / "model.safetensors", weights_meta(cfg, state["step"]))
    dist.barrier()
    best = run_dir / "best.safetensors"
    if best.is_file():
        model.load_state_dict(load_weights(best)[0])
    test = EpisodeSource(shards / "test").all(cfg.eval.test_episodes)
    accs = episode_accuracies(model, cfg, test, cfg.eval.inner_steps, dist.device, strategy, dist.rank, dist.world,
                              dist.gather_rows)
    mean, ci = ci95(accs.cpu().numpy())
    summary = {"test_accuracy": mean, "test_ci95": ci, "test_episodes": len(test), "test_inner_steps": cfg.eval.inner_steps,
               "best_val_accuracy": state["best_val"], "best_step": state["best_step"], "steps": state["step"],
               "wall_time_s": state["elapsed"], "tasks_per_s": state["tasks_seen"] / max(state["elapsed"], 1e-9),
               "world_size": dist.world, "strategy": strategy, "algorithm": cfg.algo.name,
               "allreduce_ms_per_step": 1000 * dist.reduce_seconds / max(1, state["step"] - state.get("start_step", 0))}
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        say(f"test accuracy {mean:.4f} +- {ci:.4f} (95% CI, {len(test)} episodes, {cfg.eval.inner_steps} inner steps); "
            f"{state['step']} steps in {state['elapsed'] / 60:.1f} min")
        tracker.summary(summary)
        if cfg.tracking.log_model:
            tracker.log_model(run_dir / "model.safetensors")
    tracker.finish()
    return summary
