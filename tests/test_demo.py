"""`metadist demo` in a real browser: Debian's Chromium, driven by Playwright, against the server
started as a user starts it, on the learners shipped with metadist. The page adapts to a real
Omniglot task (from ../shared's zips) and predicts what `metadist predict` writes for the same
files; its ONNX download gives the same classes; a webcam snapshot through Chromium's fake
capture device (a video file made here) lands in a class as the model sees it; every bad input
is one message in the page and the server keeps serving; a screenshot shows the classes and the
predictions in their colours."""

import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from playwright.sync_api import sync_playwright

import metadist
from metadist.distributed import free_port
from tests.conftest import REAL_OMNIGLOT, ROOT, run_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4"]  # page.html's first colours
WAYS = 5


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class Server:
    """`metadist demo` in its own process on a free port."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"demo-{self.port}.log", "w+")
        cmd = [sys.executable, "-m", "metadist", "demo", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            try:
                self.learners = get(self.url + "/api/learners")["learners"]
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.log.seek(0)
                    raise AssertionError(
                        f"metadist demo did not start: {self.log.read()}"
                    ) from None
                time.sleep(0.2)

    def alive(self) -> bool:
        """The server still answers."""
        return self.proc.poll() is None and bool(get(self.url + "/api/learners")["learners"])

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.seek(0)
        return self.log.read()


def omniglot_task(out: Path, queries: int = 3) -> Path:
    """A real Omniglot task in the exercise's layout: the first WAYS characters of the first
    evaluation alphabet, drawing 1 as support (support/0000/image_i.png is class i), drawings 2 to
    1+queries as query images (query/0000/image_j.png, class j // queries)."""
    assert REAL_OMNIGLOT.is_dir(), f"the real Omniglot is expected at {REAL_OMNIGLOT}"
    with zipfile.ZipFile(REAL_OMNIGLOT / "images_evaluation.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        alphabet = names[0].split("/")[1]
        chars = sorted({n.split("/")[2] for n in names if n.split("/")[1] == alphabet})[:WAYS]
        (out / "support" / "0000").mkdir(parents=True)
        (out / "query" / "0000").mkdir(parents=True)
        j = 0
        for i, ch in enumerate(chars):
            drawings = sorted(n for n in names if n.split("/")[1:3] == [alphabet, ch])
            (out / "support" / "0000" / f"image_{i}.png").write_bytes(z.read(drawings[0]))
            for d in drawings[1 : 1 + queries]:
                (out / "query" / "0000" / f"image_{j}.png").write_bytes(z.read(d))
                j += 1
    return out


def files(task: Path, part: str) -> list[str]:
    folder = task / part / "0000"
    return [str(folder / f"image_{i}.png") for i in range(len(list(folder.glob("*.png"))))]


def y4m(image: Path, out: Path, frames: int = 10) -> Path:
    """A video file of one still image (4:2:0, grey: chroma at 128), for
    --use-file-for-fake-video-capture."""
    grey = np.asarray(Image.open(image).convert("L").resize((112, 112)), dtype=np.uint8)
    with open(out, "wb") as f:
        f.write(b"YUV4MPEG2 W112 H112 F10:1 Ip A1:1 C420jpeg\n")
        for _ in range(frames):
            f.write(b"FRAME\n" + grey.tobytes() + bytes([128]) * (2 * 56 * 56))
    return out


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory) -> Path:
    return omniglot_task(tmp_path_factory.mktemp("demo") / "task")


@pytest.fixture(scope="module")
def browser(omniglot, tmp_path_factory):
    assert Path(CHROMIUM).is_file(), "Debian's chromium is expected (make install installs it)"
    video = y4m(Path(files(omniglot, "support")[2]), tmp_path_factory.mktemp("video") / "cam.y4m")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={video}",
            ],
        )
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))  # the shipped learners, as `make demo` serves
    yield s
    s.stop()


def open_page(browser, server: Server, learner: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server.url)
    page.wait_for_function("document.getElementById('facts-list').children.length > 0")
    page.select_option("#learner", learner)
    algorithm = json.dumps(metadist.load(learner).cfg.algo.name)
    page.wait_for_function(f"document.querySelector('#facts-list dd')?.textContent === {algorithm}")
    return page


def build_task(page, support: list[str], names=None) -> None:
    """Classes named `names`, class i given support image i by its upload button."""
    while page.locator(".class-card").count() < len(support):
        page.click("#add-class")
    for i, path in enumerate(support):
        card = page.locator(f".class-card[data-index='{i}']")
        card.locator(".class-name").fill(names[i] if names else str(i))
        card.locator(".class-files").set_input_files(path)
        card.locator(".thumbs img").first.wait_for()


def adapt(page) -> None:
    page.click("#adapt")
    page.wait_for_function("document.getElementById('adapt-info').textContent.includes('ms')")


def classify(page, query: list[str]) -> list[int]:
    page.locator("#query-files").set_input_files(query)
    page.wait_for_function(f"document.querySelectorAll('.result').length === {len(query)}")
    return [int(r.get_attribute("data-prediction")) for r in page.locator(".result").all()]


def message(page) -> str:
    page.wait_for_function("document.getElementById('message').textContent.length > 0")
    return page.locator("#message").text_content()


@pytest.mark.parametrize("learner", ["protonet", "boss"])
def test_the_page_predicts_what_metadist_predict_writes(
    browser, server, omniglot, learner, tmp_path
):
    r = run_cli("predict", "--run", learner, "--tasks", omniglot, "--out", tmp_path / "out.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    written = [int(row[1]) for row in list(csv.reader(open(tmp_path / "out.csv")))[1:]]
    page = open_page(browser, server, learner)
    build_task(page, files(omniglot, "support"))
    # the support as the model sees it: the run's preprocessing of the same file
    seen = page.locator(".class-card[data-index='2'] .thumbs img").first.get_attribute("src")
    shown = np.asarray(Image.open(io.BytesIO(_data(seen))), dtype=np.float32) / 255
    want = metadist.load(learner).preprocess(files(omniglot, "support")[2])[0, 0].numpy()
    assert np.abs(shown - want).max() <= 0.5 / 255 + 1e-6
    adapt(page)
    predicted = classify(page, files(omniglot, "query"))
    assert predicted == written
    assert sum(p == j // 3 for j, p in enumerate(predicted)) >= 10  # a learner that learned
    # the adapted task, downloaded as ONNX, gives the page's classes under onnxruntime
    import onnxruntime as ort

    with page.expect_download() as d:
        page.click("#export")
    onnx = tmp_path / "task.onnx"
    d.value.save_as(onnx)
    x = metadist.load(learner).preprocess(files(omniglot, "query")).numpy()
    session = ort.InferenceSession(str(onnx))
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert logits.argmax(-1).tolist() == predicted
    # the screenshot shows the classes (their colour swatches and names) and the predictions
    # (bars in the classes' colours, one block of bars per query image)
    png = page.screenshot(full_page=True)
    (tmp_path / "page.png").write_bytes(png)  # docs/demo.png is one of these
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    for c, colour in enumerate(PALETTE):
        rgb = np.array([int(colour[k : k + 2], 16) for k in (1, 3, 5)])
        pixels = int((np.abs(shot.astype(int) - rgb).sum(-1) < 10).sum())
        assert pixels > 200, f"class {c}'s colour {colour} is not on the screenshot ({pixels} px)"
    assert page.locator(".result .bar").count() == len(predicted) * WAYS
    assert page.locator(".class-card .class-name").nth(4).input_value() == "4"
    page.close()


def test_a_webcam_snapshot_lands_in_a_class_and_live_frames_are_classified(
    browser, server, omniglot
):
    page = open_page(browser, server, "protonet")
    support = files(omniglot, "support")
    build_task(page, support)
    page.click("#webcam-start")
    page.wait_for_function("document.getElementById('video').videoWidth > 0")
    card = page.locator(".class-card[data-index='2']")
    card.locator(".snapshot").click()
    page.wait_for_function(
        "document.querySelectorAll(\".class-card[data-index='2'] .thumbs img\").length === 2"
    )
    # the fake camera shows support image 2: the snapshot, as the model sees it, is that image
    src = card.locator(".thumbs img").nth(1).get_attribute("src")
    snap = np.asarray(Image.open(io.BytesIO(_data(src))), dtype=np.float32).ravel()
    want = metadist.load("protonet").preprocess(support[2])[0, 0].numpy().ravel() * 255
    assert np.corrcoef(snap, want)[0, 1] > 0.9
    adapt(page)
    page.click("#classify-webcam")
    page.wait_for_selector(".result.live")
    result = page.locator(".result.live").first
    assert int(result.get_attribute("data-prediction")) == 2
    page.check("#live")  # live frames: the result is replaced as frames come
    time.sleep(1.5)
    page.uncheck("#live")
    assert page.locator(".result.live .bar").count() == WAYS
    assert page.locator("#message").text_content() == ""
    page.close()


def test_bad_input_is_one_message_in_the_page_and_the_server_goes_on(
    browser, server, omniglot, tmp_path
):
    page = open_page(browser, server, "protonet")
    support = files(omniglot, "support")
    card = page.locator(".class-card[data-index='0']")
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image\n")
    card.locator(".class-files").set_input_files(str(not_image))
    assert "notes.png: not an image" in message(page)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(Path(support[0]).read_bytes()[:200])
    card.locator(".class-files").set_input_files(str(truncated))
    page.wait_for_function("document.getElementById('message').textContent.includes('cut.png')")
    assert "cannot be decoded" in message(page)
    assert card.locator(".thumbs img").count() == 0 and server.alive()
    # a colour image: a grey run reads it in grey, as prepare and predict read files
    colour = tmp_path / "colour.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(colour)
    card.locator(".class-files").set_input_files(str(colour))
    card.locator(".thumbs img").first.wait_for()
    # a class without an image; then a single class
    page.click("#adapt")
    page.wait_for_function("document.getElementById('message').textContent.includes('no image')")
    assert "class 'class 2' has no image" in message(page)
    page.locator(".class-card[data-index='1'] .remove").click()
    page.click("#adapt")
    page.wait_for_function("document.getElementById('message').textContent.includes('two')")
    assert "a task needs at least two classes" in message(page)
    # a very large upload: over the 16 MB a request may carry
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + np.random.default_rng(0).bytes(17 * 2**20))
    card.locator(".class-files").set_input_files(str(big))
    page.wait_for_function("document.getElementById('message').textContent.includes('large')")
    assert "the limit is 16 MB" in message(page)
    assert server.alive()
    # and the page still works: two classes, adapt, classify
    build_task(page, support[:2])
    adapt(page)
    assert len(classify(page, support[:2])) == 2
    page.close()


def test_a_request_while_another_is_adapting_is_told_so(browser, omniglot, tmp_path):
    slow = Server(tmp_path, "--run", "boss", "eval.inner_steps=400")  # seconds to adapt
    try:
        a, b = open_page(browser, slow, "boss"), open_page(browser, slow, "boss")
        support = files(omniglot, "support")
        build_task(a, support)
        build_task(b, support[:2])
        a.click("#adapt")
        deadline = time.time() + 30
        while not get(slow.url + "/api/learners")["busy"]:
            assert time.time() < deadline, "the first adaptation never started"
            time.sleep(0.02)
        b.click("#adapt")
        b.wait_for_function("document.getElementById('message').textContent.includes('busy')")
        assert "busy: the learner is adapting to a task; try again" in message(b)
        a.wait_for_function(
            "document.getElementById('adapt-info').textContent.includes('ms')", timeout=120_000
        )
        adapt(b)  # once it has finished, the other page adapts
        assert b.locator("#message").text_content() == ""
        a.close()
        b.close()
    finally:
        log = slow.stop()
    assert "Traceback" not in log


def test_the_server_keeps_no_file_after_it_stops(tmp_path):
    s = Server(tmp_path, "--run", "protonet")
    pid = s.proc.pid
    tmp = [p for p in Path("/tmp").glob("metadist-demo-*") if _owned_by(p, pid)]
    log = s.stop()
    assert "Traceback" not in log
    assert not [p for p in tmp if p.exists()]


def test_a_run_that_cannot_be_loaded_or_a_port_in_use_is_one_line(tmp_path):
    r = run_cli("demo", "--run", tmp_path / "nothing", "--port", str(free_port()))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "weights not found" in r.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run_cli("demo", "--run", "protonet", "--port", str(port))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr


def _owned_by(path: Path, pid: int) -> bool:
    return (path / "pid").is_file() and (path / "pid").read_text() == str(pid)


def _data(url: str) -> bytes:
    import base64

    return base64.b64decode(url.split(",", 1)[1])


def test_the_shipped_learners_load_by_name_and_say_how_they_were_made():
    for name in ("protonet", "boss"):
        learner = metadist.load(name)
        folder = Path(metadist.__file__).parent / "learners" / name
        command = (folder / "COMMAND").read_text()
        assert f"--config configs/{name}.yaml" in command and "metadist train" in command
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["algorithm"] == learner.cfg.algo.name
        assert summary["test_accuracy"] > 0.9
        assert (folder / "best.safetensors").stat().st_size < 1.5e6
        x = torch.zeros(2, *learner.image_shape)
        assert learner.embed(x).shape[0] == 2
