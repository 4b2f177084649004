"""The demo without a browser: its engine and handler on the tiny checkpoint (result, heat map, inversion reuse),
bad input as a message, and app.py's option errors."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import signal
import socket
import struct
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny import ASTRONAUT, gradient, write_config
from conftest import ROOT, TINY_WEIGHTS
from magicstyle.app import Demo, InversionCache, Request
from magicstyle.config import ConfigError, load_config
from magicstyle.images import ImageError
from models.errors import MagicStyleError

STYLE = ROOT / "examples" / "ihc.png"
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="the [app] extra (gradio)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    cfg = load_config(write_config(tmp / "tiny.yaml"), {"model": {"device": "cpu"}})  # CPU: results compared exactly
    return Demo(cfg, out_dir=tmp / "out")


def test_a_settings_error_with_an_empty_message_is_one_line(tmp_path, monkeypatch):
    """An exception without a message while merging the page's settings: a ConfigError naming its type."""
    from magicstyle.app import engine

    demo = Demo(load_config(write_config(tmp_path / "tiny.yaml")), sd=object(), files={}, out_dir=tmp_path)

    def empty(*args, **kwargs):
        raise ValueError()

    monkeypatch.setattr(engine.OmegaConf, "create", empty)
    with pytest.raises(ConfigError, match=r"^settings: ValueError$"):
        demo.config(Request(ASTRONAUT, STYLE, beta=0.3))


def parameters(path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["parameters"])


def test_result_png_heatmap_and_timings(demo):
    phases = []
    r = demo.run(Request(ASTRONAUT, STYLE, beta=0.3), progress=lambda p, done, total: phases.append((p, done, total)))
    assert r.image.size == (64, 64) and r.image.mode == "RGB"
    assert r.png.parent == demo.out_dir and r.png.suffix == ".png"
    p = parameters(r.png)  # the download keeps the chunk, written by the CLI's builder
    assert p["config"]["ffa"]["beta"] == 0.3 and p["config"]["ffa"]["alpha"] == pytest.approx(0.7)
    assert p["checkpoint"] == TINY_WEIGHTS.name and p["content"] == ASTRONAUT.name and p["style"] == STYLE.name
    with Image.open(r.png) as img:
        assert (np.asarray(img.convert("RGB")) == np.asarray(r.image)).all()
    assert isinstance(r.heatmap, Image.Image) and np.asarray(r.heatmap).std() > 0  # the diagnostics' figure
    assert r.attention["format"] == "magicstyle-attention/1" and 0.0 < r.attention["mean"] < 1.0
    assert set(r.seconds) == {"encode", "invert", "generate", "decode"}
    assert [p for p, done, total in phases if done == total] == ["encode", "invert", "generate", "decode"]


def test_attention_diagnostics_follow_the_settings(demo):
    """The heat map's numbers: one style share per layer and step, moving with beta; plain attention reports none;
    the checkbox off gives neither map nor record."""
    from magicstyle.pipeline import select_layers

    low, high = (demo.run(Request(ASTRONAUT, STYLE, beta=b)).attention for b in (0.0, 1.0))
    layers = select_layers(demo.sd.unet, demo.cfg.ffa.layers)
    assert low["layers"] == layers and len(low["style_share"]) == len(layers)
    assert all(len(row) == demo.cfg.steps and all(0.0 <= v <= 1.0 for v in row) for row in low["style_share"])
    assert low["style_share"] != high["style_share"]
    plain = demo.run(Request(ASTRONAUT, STYLE, recipe="plain"))
    assert plain.attention["mean"] is None and plain.heatmap is not None  # the figure says so
    off = demo.run(Request(ASTRONAUT, STYLE, heatmap=False))
    assert off.heatmap is None and off.attention is None


def test_only_beta_changed_reuses_the_inversion(tmp_path):
    cfg = load_config(write_config(tmp_path / "tiny.yaml"), {"model": {"device": "cpu"}})
    demo = Demo(cfg, out_dir=tmp_path / "out")
    content, style = gradient(tmp_path / "c.png"), gradient(tmp_path / "s.png", flip=True)
    first = demo.run(Request(content, style, beta=0.2))
    assert first.reused == [] and first.unet_rows["invert"] == 2 * 2  # 2 steps x [content, style]
    second = demo.run(Request(content, style, beta=0.6, prompt="a painting", recipe="ffa"))
    assert second.reused == ["content", "style"] and second.unet_rows["invert"] == 0
    assert second.seconds["encode"] == second.seconds["invert"] == 0.0
    assert second.unet_rows["generate"] == first.unet_rows["generate"]
    assert (np.asarray(second.image) != np.asarray(first.image)).any()
    # The reused inversion gives the same pixels as a fresh one (FFF does not consume or alter it).
    fresh = Demo(cfg, sd=demo.sd, out_dir=tmp_path / "fresh")
    fresh = fresh.run(Request(content, style, beta=0.6, prompt="a painting"))
    assert fresh.reused == [] and (np.asarray(fresh.image) == np.asarray(second.image)).all()
    # A new style with the same portrait inverts the style alone; what changes CSDI inverts both again.
    third = demo.run(Request(content, ASTRONAUT, beta=0.6))
    assert third.reused == ["content"] and third.unet_rows["invert"] == 2 * 1
    assert demo.run(Request(style, content)).reused == ["content", "style"]  # the same two images, swapped
    assert demo.run(Request(content, content)).unet_rows["invert"] == 0
    assert demo.run(Request(content, style, beta=0.6, steps=1)).reused == []
    assert demo.run(Request(content, style, store_mode="recompute")).reused == []


def test_small_face_pass(demo, tmp_path, monkeypatch):
    """The checkbox runs magicstyle/smallface.py: a small face is stylized again in its crop and pasted back (the rest
    of the image is the plain run's); without the detector file the page gets one line and the app keeps serving."""
    import magicstyle.smallface

    plain = demo.run(Request(ASTRONAUT, STYLE, beta=0.3, heatmap=False))
    assert plain.face is None
    side = min(Image.open(ASTRONAUT).size)
    box = [0.4 * side, 0.3 * side, 0.55 * side, 0.45 * side]
    monkeypatch.setattr(magicstyle.smallface, "load_detector", lambda cfg: lambda img: magicstyle.smallface.Faces(
        np.array([box], np.float32), np.array([0.9], np.float32), np.zeros((1, 5, 2), np.float32)))
    refined = demo.run(Request(ASTRONAUT, STYLE, beta=0.3, heatmap=False, face_refine=True))
    assert refined.face["ran"] and "face" in refined.seconds
    x0, y0, x1, y1 = refined.face["box"]
    outside = np.ones((64, 64), bool)
    outside[y0:y1, x0:x1] = False
    assert (np.asarray(refined.image)[outside] == np.asarray(plain.image)[outside]).all()
    assert (np.asarray(refined.image)[~outside] != np.asarray(plain.image)[~outside]).any()

    monkeypatch.undo()
    demo.cfg.face.detector = str(tmp_path / "det_10g.onnx")  # absent
    try:
        with pytest.raises(MagicStyleError, match="face.detector") as e:
            demo.run(Request(ASTRONAUT, STYLE, face_refine=True))
        assert "\n" not in str(e.value)
    finally:
        demo.cfg.face.detector = load_config().face.detector
    assert demo.run(Request(ASTRONAUT, STYLE)).face is None  # still serving


def test_inversion_cache_is_bounded():
    inv = lambda nbytes: type("Inv", (), {"store": type("S", (), {"nbytes": nbytes})(), "z_T": torch.zeros(0)})()
    cache = InversionCache(items=2, max_bytes=100)
    for key in "abc":
        cache.put(key, inv(10))
    assert list(cache.entries) == ["b", "c"]  # least recently used out
    cache.get("b")
    cache.put("d", inv(10))
    assert list(cache.entries) == ["b", "d"]
    cache.put("e", inv(95))  # over the byte bound: all older ones go, the newest stays even when alone too big
    assert list(cache.entries) == ["e"]
    cache.put("f", inv(1000))
    assert list(cache.entries) == ["f"]


def test_output_folder_keeps_the_newest_pngs(tmp_path, monkeypatch):
    import magicstyle.app.engine as engine

    cfg = load_config(write_config(tmp_path / "tiny.yaml", steps=1), {"model": {"device": "cpu"}})
    demo = Demo(cfg, out_dir=tmp_path / "out")
    monkeypatch.setattr(engine, "KEEP_OUTPUTS", 2)
    pngs = [demo.run(Request(ASTRONAUT, STYLE, beta=b, heatmap=False)).png for b in (0.1, 0.2, 0.3)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in pngs[1:]]


def huge_png(path, width=20000, height=20000):
    """A PNG header claiming width x height pixels (400 megapixels), with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("case", ["no image", "not an image", "huge image", "bad beta", "bad steps", "bad recipe"])
def test_bad_input_is_a_message_and_the_demo_keeps_serving(demo, tmp_path, case):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    request = {
        "no image": Request(None, STYLE),
        "not an image": Request(ASTRONAUT, text),
        "huge image": Request(huge_png(tmp_path / "huge.png"), STYLE),
        "bad beta": Request(ASTRONAUT, STYLE, beta=1.5),
        "bad steps": Request(ASTRONAUT, STYLE, steps=0),
        "bad recipe": Request(ASTRONAUT, STYLE, recipe="nope"),
    }[case]
    expected = ImageError if "image" in case else ConfigError
    with pytest.raises(expected) as e:
        demo.run(request)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) not in message  # one line, no server paths
    assert {"no image": "no content image", "not an image": "the style image: cannot read image notes.png",
            "huge image": "too large", "bad beta": "ffa.beta", "bad steps": "steps", "bad recipe": "ffa.recipe"}[case] \
        in message
    assert demo.run(Request(ASTRONAUT, STYLE, beta=0.3)).image.size == (64, 64)  # still serving


@needs_gradio
def test_handler_returns_what_the_page_shows(demo):
    from magicstyle.app.ui import handle

    demo.run(Request(ASTRONAUT, STYLE))  # both images inverted before: the handler reuses them
    calls = []
    png, heat, timings = handle(demo, str(ASTRONAUT), str(STYLE), "ffa", 0.4, 2.0, 5.0, "a portrait", 0, "memory",
                                True, progress=lambda value, desc=None, unit=None: calls.append((desc, value)))
    assert parameters(png)["config"]["ffa"]["beta"] == 0.4 and isinstance(heat, Image.Image)
    assert "| generate |" in timings and "Both inversions were reused" in timings  # inverted by the first test
    assert ("generate", (2, 2)) in calls


@needs_gradio
def test_handler_turns_bad_input_into_a_page_message(demo, tmp_path):
    import gradio as gr

    from magicstyle.app.ui import handle, image_input

    with pytest.raises(gr.Error, match="no content image"):
        handle(demo, None, str(STYLE), "ffa", 0.2, 2, 5.0, "", 0, "memory", True)
    with pytest.raises(gr.Error, match="steps must be an integer"):
        handle(demo, str(ASTRONAUT), str(STYLE), "ffa", 0.2, 2.5, 5.0, "", 0, "memory", True)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    from gradio.data_classes import ImageData

    with pytest.raises(gr.Error, match="content image: cannot read this file as an image"):
        image_input("content image", "content").preprocess(ImageData(path=str(text), orig_name="notes.png"))


def test_requests_run_one_at_a_time(demo, monkeypatch):
    """Two requests at once (threads, as the server runs them) never use the model together: the engine's lock."""
    import threading

    import magicstyle.app.engine as engine

    inside, most, real = [0], [0], engine.fff

    def slow_fff(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        try:
            return real(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(engine, "fff", slow_fff)
    threads = [threading.Thread(target=demo.run, args=(Request(ASTRONAUT, STYLE, beta=b),)) for b in (0.1, 0.9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 1


@needs_gradio
def test_page_queues_requests_one_at_a_time(demo):
    import gradio as gr

    from attention import RECIPES
    from magicstyle.app.ui import QUEUE_SIZE, build

    async def build_in_a_loop():  # outside a running loop, gradio's queue makes (and leaves open) loops of its own
        return build(demo)

    page = asyncio.run(build_in_a_loop())
    (stylize,) = [fn for fn in page.fns.values() if fn.api_name == "stylize"]
    assert stylize.concurrency_limit == 1 and page._queue.max_size == QUEUE_SIZE
    (recipes,) = [b for b in page.blocks.values() if isinstance(b, gr.Dropdown)]
    assert [c[1] for c in recipes.choices] == list(RECIPES)  # a newly registered recipe appears by itself


def hide_gradio(monkeypatch) -> None:
    """Make `import gradio` fail as if the [app] extra were not installed (for this test only)."""
    import magicstyle.app

    monkeypatch.setitem(sys.modules, "gradio", None)  # None in sys.modules: ImportError on import
    monkeypatch.setitem(sys.modules, "magicstyle.app.ui", None)
    monkeypatch.delattr(magicstyle.app, "ui", raising=False)


@pytest.fixture(params=["with gradio", "without gradio"])
def gradio_or_not(request, monkeypatch):
    """app.py's option checks run with and without the [app] extra."""
    if request.param == "without gradio":
        hide_gradio(monkeypatch)
    elif importlib.util.find_spec("gradio") is None:
        pytest.skip("the [app] extra (gradio)")


def app_main(argv: list[str]) -> tuple[int, list[str]]:
    """app.main(argv) -> (exit status, stderr lines), with argparse's exits caught."""
    import app

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = app.main(argv)
        except SystemExit as e:  # argparse's errors (a non-number)
            rc = e.code
    return rc, err.getvalue().strip().splitlines()


@pytest.mark.parametrize("argv, words", [
    (["--weights", "missing.safetensors"], "not found"),
    (["--port", "70000"], "--port"),
    (["ffa.nope=1"], "configuration"),
    (["--keep-inversions", "x"], "--keep-inversions"),
    (["--keep-inversions", "0"], "--keep-inversions must be at least 1"),
    (["--keep-inversions", "-3"], "--keep-inversions must be at least 1"),
    (["--cache-gib", "-1"], "--cache-gib must be"),
    (["--cache-gib", "0"], "--cache-gib must be"),
    (["--cache-gib", "nan"], "--cache-gib must be"),
    (["--host", "192.0.2.1"], "cannot listen"),  # a documentation address: not this machine's (no traffic)
    (["--port", "BUSY"], "cannot listen"),
])
def test_app_option_errors_are_one_line(argv, words, tmp_path, gradio_or_not):
    config = write_config(tmp_path / "tiny.yaml")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = [str(busy.getsockname()[1]) if a == "BUSY" else a for a in argv]
        before = signal.getsignal(signal.SIGTERM)
        rc, lines = app_main(["--config", str(config), *argv])
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    assert signal.getsignal(signal.SIGTERM) == before  # the demo's SIGTERM handler is the demo's alone


def test_app_without_gradio_says_so_after_the_options(tmp_path, monkeypatch):
    """Good options and no gradio: one line naming the [app] extra, before the model is loaded."""
    hide_gradio(monkeypatch)
    rc, lines = app_main(["--config", str(write_config(tmp_path / "tiny.yaml")), "--port", "0"])
    assert rc == 2 and len(lines) == 1 and "pip install -e '.[app]'" in lines[0]


SERVE_FOREVER = """
import sys, time, types
import magicstyle.app

def serve(demo, **options):  # the page's server, without gradio: wait until stopped
    print(demo.out_dir, flush=True)
    while True:
        time.sleep(0.05)

ui = types.ModuleType("magicstyle.app.ui")
ui.serve = serve
sys.modules["magicstyle.app.ui"] = magicstyle.app.ui = ui
import app
sys.exit(app.main(sys.argv[1:]))
"""


def test_sigterm_removes_the_temporary_folder(tmp_path):
    """Stopped by SIGTERM (not only Ctrl-C), the demo removes its folder of result PNGs, as the README says."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_FOREVER, "--config", str(write_config(tmp_path / "t.yaml")),
                             "--port", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out_dir = proc.stdout.readline().strip()  # printed once the model is loaded and the page "serves"
        assert out_dir and os.path.isdir(out_dir), proc.stderr.read() if proc.poll() is not None else out_dir
        proc.terminate()
        proc.wait(60)
    finally:
        proc.kill()
    assert not os.path.exists(out_dir)
