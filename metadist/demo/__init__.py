"""`metadist demo`: a local web page to teach a trained learner a task and watch it predict.

The page (page.html, plain HTML and JavaScript, no build step) lets a user add classes (a name;
images by upload, drag and drop, paste or a webcam snapshot), see the support set as the model
sees it, adapt with one click, classify images or live webcam frames with per-class
probabilities and the milliseconds taken, download the adapted task as ONNX, and read the run's
facts (algorithm, backbone, test accuracy +- 95% CI, training curve).

The server is a small ASGI app on Starlette, served by uvicorn (the `demo` extra): every step is
the Python API's (metadist.api: `Learner.preprocess`, `adapt`, `Task.probabilities`,
`Task.export`), so the page's predictions are `metadist predict`'s. It listens on 127.0.0.1
unless told another address. Images stay in this process's memory; an ONNX download is written
in a temporary folder removed when the server stops. Bad input (a file that is not an image, a
class without images, fewer than two classes, a request over MAX_BODY bytes, a request while
another computes) is one message in the page, and the server goes on serving.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import torch

from metadist.errors import MetadistError

MAX_BODY = 16 * 1024 * 1024  # bytes in one request (its images, base64-encoded)
MAX_IMAGES = 200  # images in one request
MAX_PIXELS = 40_000_000  # pixels in one image (width x height)
KEEP_TASKS = 32  # adapted tasks kept for predictions and downloads, newest first
PAGE = Path(__file__).with_name("page.html")


class DemoError(MetadistError):
    """Something the page sent that the learner cannot take: one line, shown in the page."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Demo:
    """The learners the page offers (loaded on first use), the adapted tasks, and the one lock
    that lets one request compute at a time (a second is answered at once, not queued)."""

    def __init__(self, runs: list[str], overrides=(), device=None):
        from metadist.learners import resolve

        self.runs = {_name(r): resolve(r) for r in runs}
        self.overrides, self.device = list(overrides), device
        self.learners: dict = {}
        self.tasks: OrderedDict = OrderedDict()
        self.busy = threading.Lock()
        self.doing = ""
        self.tmp = tempfile.TemporaryDirectory(prefix="metadist-demo-")
        (Path(self.tmp.name) / "pid").write_text(str(os.getpid()))  # whose folder this is

    def close(self) -> None:
        self.tmp.cleanup()

    def learner(self, name: str):
        from metadist.api import load

        if name not in self.runs:
            raise DemoError(f"no learner {name!r} here; this demo serves {', '.join(self.runs)}")
        if name not in self.learners:
            self.learners[name] = load(self.runs[name], self.device, self.overrides)
        return self.learners[name]

    def computing(self, what: str):
        """The lock, taken without waiting: a request while another computes is refused."""
        demo = self

        class Hold:
            def __enter__(self):
                if not demo.busy.acquire(blocking=False):
                    raise DemoError(
                        f"busy: the learner is {demo.doing}; try again when it has finished", 409
                    )
                demo.doing = what

            def __exit__(self, *exc):
                demo.doing = ""
                demo.busy.release()

        return Hold()

    # the requests, each a dict in and a dict out

    def facts(self, name: str) -> dict:
        """What the page shows of a run: algorithm, backbone, test accuracy, its curves."""
        learner = self.learner(name)
        cfg, run = learner.cfg, self.runs[name]
        folder = run if run.is_dir() else run.parent
        summary = _json(folder / "summary.json")
        curve = {"step": [], "accuracy": [], "val_step": [], "val_accuracy": []}
        metrics = folder / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                r = json.loads(line) if line.strip() else {}
                if "val_accuracy" in r:
                    curve["val_step"].append(r["step"])
                    curve["val_accuracy"].append(r["val_accuracy"])
                elif "accuracy" in r:
                    curve["step"].append(r["step"])
                    curve["accuracy"].append(r["accuracy"])
        c, h, w = learner.image_shape
        return {
            "name": name,
            "run": str(run),
            "algorithm": cfg.algo.name,
            "backbone": cfg.model.backbone,
            "dataset": cfg.data.source,
            "image": f"{h}x{w} {'grey' if c == 1 else 'RGB'}",
            "trained": f"{cfg.data.ways}-way {cfg.data.shots}-shot",
            "inner_steps": learner.inner(cfg.data.ways).steps,
            "max_ways": learner.max_ways,
            "test_accuracy": summary.get("test_accuracy"),
            "test_ci95": summary.get("test_ci95"),
            "test_episodes": summary.get("test_episodes"),
            "steps": summary.get("steps"),
            "wall_time_s": summary.get("wall_time_s"),
            "curve": curve,
        }

    def preview(self, req: dict) -> dict:
        """The images as the model sees them (the run's preprocessing), as PNG data URLs."""
        learner = self.learner(_field(req, "learner", str))
        x = learner.preprocess(_images(req.get("images"), learner, "images"))
        return {"images": [_png(t) for t in x]}

    def adapt(self, req: dict) -> dict:
        learner = self.learner(_field(req, "learner", str))
        classes = _field(req, "classes", list)
        if len(classes) < 2:
            raise DemoError(
                f"{len(classes)} class{'es' if len(classes) != 1 else ''}: a task needs at least "
                "two classes, each with at least one image"
            )
        names, support, labels = [], [], []
        for c, cls in enumerate(classes):
            name = str(cls.get("name") or f"class {c + 1}") if isinstance(cls, dict) else ""
            images = cls.get("images") if isinstance(cls, dict) else None
            if not images:
                raise DemoError(f"class {name or c + 1!r} has no image: add one, or remove it")
            got = _images(images, learner, f"class {name!r}")
            names.append(name)
            support += got
            labels += [c] * len(got)
        with self.computing("adapting to a task"):
            t0 = time.perf_counter()
            try:
                task = learner.adapt(support, labels)
            except ValueError as e:  # the API's APIError: a learned head's rows, ...
                raise DemoError(str(e)) from None
            ms = 1000 * (time.perf_counter() - t0)
        tid = uuid.uuid4().hex[:12]
        self.tasks[tid] = (task, names, _field(req, "learner", str))
        while len(self.tasks) > KEEP_TASKS:
            self.tasks.popitem(last=False)
        return {"task": tid, "classes": names, "shots": len(support), "ms": round(ms, 2)}

    def predict(self, req: dict) -> dict:
        task, names, _learner = self.task(_field(req, "task", str))
        images = _images(req.get("images"), task.learner, "images")
        with self.computing("classifying images"):
            t0 = time.perf_counter()
            probs = task.probabilities(images).cpu()
            ms = 1000 * (time.perf_counter() - t0)
        return {
            "classes": names,
            "predictions": [int(p.argmax()) for p in probs],
            "probabilities": [[round(float(v), 6) for v in p] for p in probs],
            "ms": round(ms, 2),
        }

    def export(self, tid: str) -> Path:
        task, _names, _ = self.task(tid)
        out = Path(self.tmp.name) / f"task-{tid}.onnx"
        with self.computing("exporting a task"):
            if not out.is_file():
                task.export(out)
        return out

    def task(self, tid: str):
        if tid not in self.tasks:
            raise DemoError(
                f"no adapted task {tid!r} (adapt first; the server keeps the last {KEEP_TASKS})",
                404,
            )
        return self.tasks[tid]


def _name(run: str) -> str:
    p = Path(run)
    return p.stem if p.suffix == ".safetensors" else p.name


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _field(req: dict, key: str, kind: type):
    v = req.get(key)
    if not isinstance(v, kind):
        raise DemoError(f"request: '{key}' missing or not a {kind.__name__}")
    return v


def _images(items, learner, what: str) -> list[torch.Tensor]:
    """[{name, data: a data URL or base64}] -> the images as (C, H, W) uint8, each decoded in the
    run's channels by the function `prepare` and `predict` read files with."""
    from PIL import Image

    from metadist.data.sources import DataError, decode

    if not isinstance(items, list) or not items:
        raise DemoError(f"{what}: no image given")
    if len(items) > MAX_IMAGES:
        raise DemoError(f"{what}: {len(items)} images in one request; at most {MAX_IMAGES}", 413)
    out = []
    for i, item in enumerate(items):
        item = item if isinstance(item, dict) else {"data": item}
        name = str(item.get("name") or f"image {i + 1}")
        data = str(item.get("data") or "")
        try:
            raw = base64.b64decode(data.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise DemoError(f"{name}: not a base64 image") from None
        not_image = DemoError(
            f"{name}: not an image, or one that cannot be decoded (give a PNG, JPEG, GIF, BMP, "
            "TIFF or WebP file)"
        )
        try:
            with Image.open(io.BytesIO(raw)) as header:  # the size, before any pixel is decoded
                w, h = header.size
        except (OSError, ValueError, Image.DecompressionBombError):
            raise not_image from None
        if w * h > MAX_PIXELS:
            raise DemoError(
                f"{name}: {w}x{h} pixels; at most {MAX_PIXELS // 1_000_000} megapixels an image",
                413,
            )
        try:
            out.append(decode(name, learner.image_shape[0], raw))
        except DataError:
            raise not_image from None
    return out


def _png(x: torch.Tensor) -> str:
    """(C, H, W) float in [0, 1] -> a PNG data URL."""
    from PIL import Image

    a = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    a = a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def app(demo: Demo):
    """The ASGI app: the page, and a JSON request per action (errors as {"error": line})."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    async def page(_request):
        return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-store"})

    routes = [
        Route("/", page),
        Route(
            "/api/learners", _action(lambda r, q: {"learners": list(demo.runs), "busy": demo.doing})
        ),
        Route("/api/facts/{name}", _action(lambda r, q: demo.facts(q.path_params["name"]))),
        Route("/api/preview", _action(lambda r, q: demo.preview(r)), methods=["POST"]),
        Route("/api/adapt", _action(lambda r, q: demo.adapt(r)), methods=["POST"]),
        Route("/api/predict", _action(lambda r, q: demo.predict(r)), methods=["POST"]),
        Route("/api/export/{task}", _action(lambda r, q: demo.export(q.path_params["task"]))),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        demo.close()  # at shutdown (uvicorn then re-raises a SIGTERM, so no `finally` would run)

    return Starlette(routes=routes, lifespan=lifespan)


def _action(fn):
    """An endpoint: the request's JSON body (POST) -> fn(body, request) in a worker thread (the
    server answers others meanwhile) -> JSON, or the file fn returns; a DemoError is its line."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, JSONResponse

    async def endpoint(request):
        try:
            req = await _body(request) if request.method == "POST" else {}
            out = await run_in_threadpool(fn, req, request)
        except DemoError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except MetadistError as e:  # a run that cannot be loaded, ...
            return JSONResponse({"error": str(e)}, status_code=400)
        if isinstance(out, Path):
            return FileResponse(out, filename=out.name, media_type="application/octet-stream")
        return JSONResponse(out)

    return endpoint


async def _body(request) -> dict:
    """The request's JSON object, at most MAX_BODY bytes (a larger one is read to its end, so
    the browser gets the answer, and refused)."""
    size = request.headers.get("content-length", "")
    chunks, got = [], 0
    async for chunk in request.stream():
        got += len(chunk)
        if got <= MAX_BODY:
            chunks.append(chunk)
    if got > MAX_BODY or (size.isdigit() and int(size) > MAX_BODY):
        raise DemoError(_too_large(max(got, int(size or 0))), 413)
    try:
        req = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        raise DemoError("request: not JSON") from None
    if not isinstance(req, dict):
        raise DemoError("request: expected a JSON object")
    return req


def _too_large(n: int) -> str:
    return (
        f"upload too large: {n / 2**20:.1f} MB in one request, the limit is "
        f"{MAX_BODY // 2**20} MB; send fewer or smaller images"
    )


def serve(runs: list[str], host: str, port: int, overrides=(), device=None) -> None:
    """Serve the page until interrupted; the learners are checked (loaded) before it listens."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise DemoError(
            "metadist demo needs the demo extra: pip install 'metadist[demo]' (starlette, uvicorn)"
        ) from None
    try:  # a port in use is one line, before anything is loaded
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as e:
        raise DemoError(
            f"cannot listen on {host}:{port} ({e.strerror}): choose another --port"
        ) from None
    demo = Demo(runs, overrides, device)
    for name in demo.runs:
        demo.learner(name)  # a run that cannot be loaded is one line now, not in the page
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"metadist demo: listening on {host}: anyone who reaches it can use the page")
    print(f"metadist demo: http://{host}:{port}/ (learners: {', '.join(demo.runs)})", flush=True)
    config = uvicorn.Config(app(demo), host=host, port=port, log_level="warning")
    try:
        uvicorn.Server(config).run()
    finally:
        demo.close()
