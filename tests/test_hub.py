"""Model files by Hub reference (models/hub.py): ``hf:OWNER/REPO/FILE.safetensors[@REV]`` through the CLI.

A local server (tests/_hub_server.py) speaks the Hub's file protocol and serves the tiny checkpoint; ``HF_ENDPOINT``
points at it and ``HF_HOME`` at a temporary folder.  huggingface_hub reads those variables once, at import, so
``hub_environment`` sets them and re-reads its ``constants`` module (tests/conftest.py makes the default offline).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import magicstyle.pipeline as pipeline
import train_free_run
from _hub_server import HubServer
from _tiny import ASTRONAUT, TINY_WEIGHTS, gradient, tree, write_config
from conftest import ROOT
from magicstyle.config import load_config
from models.hub import PAIRED_VAE, VAE_FT_MSE, HubError, HubFile, model_refs, parse_ref, resolve_model_file

REPO, FILE = "test-org/tiny-sd15", "sd15_tiny_random.safetensors"
REF = f"hf:{REPO}/{FILE}"
TINY = TINY_WEIGHTS.read_bytes()
TINY_SHA = hashlib.sha256(TINY).hexdigest()


@contextlib.contextmanager
def hub_environment(**env):
    """Set (value) or unset (None) environment variables, and let huggingface_hub read them again."""
    saved = {key: os.environ.get(key) for key in env}
    try:
        _set(env)
        _reload_hub()
        yield
    finally:
        _set(saved)
        _reload_hub()


def _reload_hub():
    """huggingface_hub's constants read again.  Before 1.0 it also kept one HTTP session per thread, built with an
    offline adapter while HF_HUB_OFFLINE was set, and ``hf_hub_url`` read a copy of the URL template taken at import:
    both are renewed too (what a new process, which sets the variables before the import, gets anyway)."""
    import huggingface_hub.constants as constants
    import huggingface_hub.file_download as file_download
    import huggingface_hub.utils as utils

    importlib.reload(constants)
    if hasattr(utils, "reset_sessions"):  # huggingface_hub < 1.0
        utils.reset_sessions()
        file_download.HUGGINGFACE_CO_URL_TEMPLATE = constants.HUGGINGFACE_CO_URL_TEMPLATE


def _set(env):
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = train_free_run.main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def one_line_error(rc, out, err) -> str:
    assert rc == 2 and out == "", (rc, out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def cached_files(home: Path) -> list[Path]:
    """Every file in the Hub cache except its lock files (blobs, snapshots, partial downloads)."""
    return sorted(p for p in (home / "hub").rglob("*") if p.is_file() and ".locks" not in p.parts)


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", lambda cfg: pytest.fail("the model load started"))
    monkeypatch.setattr(pipeline, "stylize", lambda *a, **k: pytest.fail("stylize ran"))


@pytest.fixture
def fast_retries(monkeypatch):
    """huggingface_hub waits between its retries (1 s to 8 s); the tests need not."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


@pytest.fixture
def home(tmp_path):
    return tmp_path / "hf-home"


@pytest.fixture
def hub(home):
    """The tiny checkpoint on a local Hub (also under a folder, and in a gated repository), online, empty cache."""
    repos = {REPO: {FILE: TINY, "unet/model.safetensors": TINY, "model.ckpt": b"pickle"},
             "test-org/gated": {FILE: TINY}}
    with HubServer(repos, gated=["test-org/gated"], token="hf_test_token") as server:
        with hub_environment(HF_ENDPOINT=server.url, HF_HOME=home, HF_HUB_OFFLINE="0"):
            yield server


@pytest.fixture
def job(tmp_path):
    """A 64 px, 2-step run of the tiny model: argv without --weights (the config names no weights of its own)."""
    config = write_config(tmp_path / "run.yaml", weights=None)
    content = gradient(tmp_path / "portrait.png", (64, 64))
    return ["--content", content, "--style", ASTRONAUT, "--config", config, "--quiet"]


# ------------------------------------------------------------------------------------------------- references


def test_parse_ref():
    assert parse_ref(REF) == HubFile(REPO, FILE, None)
    assert parse_ref("hf:a/b/sub/dir/m.safetensors@v1.0") == HubFile("a/b", "sub/dir/m.safetensors", "v1.0")
    assert str(parse_ref("hf:a/b/m.safetensors@refs/pr/1")) == "hf:a/b/m.safetensors@refs/pr/1"
    for bad, words in [("hf:a/b", "not a Hub reference"), ("hf:a/m.safetensors", "not a Hub reference"),
                       ("hf:a/b/m.safetensors@", "not a Hub reference"), ("hf:a/b/m.ckpt", "pickle"),
                       ("hf:a/b/pytorch_model.bin", "pickle"), ("hf:a/b/model.onnx", "only .safetensors")]:
        with pytest.raises(HubError, match=words):
            parse_ref(bad)


@pytest.mark.parametrize("ref, words", [("hf:o/r/model.ckpt", ["model.ckpt", "pickle", "model.weights"]),
                                        ("hf:o/r", ["not a Hub reference", "model.weights"])])
def test_bad_references_are_refused_before_anything_is_fetched(ref, words, job, no_model, hub, home, tmp_path):
    err = one_line_error(*cli([*job, "--weights", ref, "--output", tmp_path / "o.png"]))
    assert all(w in err for w in words), err
    assert hub.requests == [] and not home.exists()


def test_vae_auto_pairs_realistic_vision_with_its_vae():
    cfg = load_config()
    assert model_refs(cfg) == {"model.weights": cfg.model.weights, "model.vae": VAE_FT_MSE}
    assert parse_ref(cfg.model.weights).path in PAIRED_VAE and parse_ref(VAE_FT_MSE).revision  # pinned
    tiny = str(TINY_WEIGHTS)
    assert model_refs(load_config(None, {"model": {"weights": tiny}})) == {"model.weights": tiny}  # auto: its own
    assert load_config(None, {"model": {"vae": "none"}}).model.vae is None  # --vae none: the checkpoint's own VAE


def test_a_file_of_that_name_in_weights_is_used_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / FILE).write_bytes(b"local copy")
    assert resolve_model_file(REF) == Path("weights") / FILE  # offline (conftest), no cache: it never asks the Hub
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        resolve_model_file(REF, local_dir=tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------- a local Hub


def test_run_from_the_hub_then_offline_from_the_cache(job, hub, home, tmp_path):
    """The issue's scenario: a run downloads the weights; with the server gone and HF_HUB_OFFLINE=1, a second run (a
    new process, `python -m magicstyle`) finds them in the cache and gives the same image."""
    first = tmp_path / "first.png"
    rc, out, err = cli([*job, "--weights", REF, "--output", first])
    assert rc == 0, err
    assert ("GET", f"/{REPO}/resolve/main/{FILE}", None) in hub.requests
    blobs = [p for p in cached_files(home) if "blobs" in p.parts]
    assert [p.name for p in blobs] == [TINY_SHA] and blobs[0].read_bytes() == TINY
    with Image.open(first) as img:
        assert img.size == (64, 64)
    hub.stop()

    second = tmp_path / "second.png"
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "magicstyle", *map(str, job), "--weights", REF, "--output", second],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    with Image.open(first) as a, Image.open(second) as b:
        np.testing.assert_allclose(np.asarray(a, np.int16), np.asarray(b, np.int16), atol=1)


def test_download_only_fetches_what_the_config_names_and_prints_where(job, hub, home, no_model):
    vae = f"hf:{REPO}/unet/model.safetensors@main"
    rc, out, err = cli(["--config", job[5], "--weights", REF, "--vae", vae, "--download-only", "--quiet"])
    assert rc == 0 and err == "", err
    printed = dict(line.split(": ", 1) for line in out.splitlines())
    assert list(printed) == ["model.weights", "model.vae"]
    for path in printed.values():
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(home.resolve())
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == TINY_SHA
    assert printed["model.vae"].endswith("unet/model.safetensors")


@pytest.mark.parametrize("ref, words", [
    (f"hf:test-org/missing/{FILE}", ["test-org/missing", "not found", FILE]),
    (f"hf:{REPO}/nope.safetensors", [REPO, "nope.safetensors", "not found"]),
    (f"hf:{REPO}/{FILE}@v9", [REPO, "v9", "not found"]),
    (f"hf:test-org/gated/{FILE}", ["test-org/gated", "gated", "HF_TOKEN"]),
])
def test_hub_errors_are_one_line(ref, words, job, hub, home, no_model, tmp_path):
    err = one_line_error(*cli([*job, "--weights", ref, "--output", tmp_path / "o.png"]))
    assert all(w in err for w in words), err
    assert not (tmp_path / "o.png").exists() and not [p for p in cached_files(home) if "blobs" in p.parts]


@pytest.mark.parametrize("how", ["hf auth login", "HF_TOKEN"])
def test_a_gated_repository_with_a_token(how, job, hub, home, monkeypatch):
    if how == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    else:  # where `hf auth login` (formerly `huggingface-cli login`) keeps the token
        home.mkdir(parents=True, exist_ok=True)
        (home / "token").write_text("hf_test_token")
    rc, out, err = cli(["--config", job[5], "--weights", f"hf:test-org/gated/{FILE}", "--download-only", "--quiet"])
    assert rc == 0, err  # the server refuses the repository without the token


def test_no_network_and_an_empty_cache(job, hub, home, no_model, fast_retries, tmp_path):
    hub.stop()
    err = one_line_error(*cli([*job, "--weights", REF, "--output", tmp_path / "o.png"]))
    assert "cannot reach the Hub" in err and REF in err
    with hub_environment(HF_HUB_OFFLINE="1"):
        err = one_line_error(*cli([*job, "--weights", REF, "--output", tmp_path / "o.png"]))
    assert "HF_HUB_OFFLINE" in err and f"weights/{FILE}" in err
    assert cached_files(home) == [] and not (tmp_path / "o.png").exists()


def test_a_download_cut_mid_file_leaves_nothing_a_later_run_uses(job, hub, home, no_model, fast_retries, tmp_path):
    import huggingface_hub

    hub.drop_after[FILE] = len(TINY) // 2
    err = one_line_error(*cli([*job, "--weights", REF, "--output", tmp_path / "o.png"]))
    assert "interrupted" in err or "failed" in err, err
    # huggingface_hub >= 1.0 resumes the cut download (a second GET) and then removes the part; older ones give up at
    # once and keep it as BLOB.incomplete, which only a later download resumes from: no run takes it for the file
    gets, blobs = [m for m, *_ in hub.requests].count("GET"), [p for p in cached_files(home) if "blobs" in p.parts]
    if int(huggingface_hub.__version__.split(".")[0]) >= 1:
        assert gets > 1 and not blobs
    else:
        assert gets >= 1 and all(p.suffix == ".incomplete" for p in blobs)
    with hub_environment(HF_HUB_OFFLINE="1"):  # nothing in the cache passes for the file
        one_line_error(*cli([*job, "--weights", REF, "--output", tmp_path / "o.png"]))

    del hub.drop_after[FILE]  # the network is back: the whole file, and only it
    rc, out, err = cli(["--config", job[5], "--weights", REF, "--download-only", "--quiet"])
    assert rc == 0, err
    assert hashlib.sha256(Path(out.split(": ", 1)[1].strip()).read_bytes()).hexdigest() == TINY_SHA


class RemoteProtocolError(Exception):
    """What the HTTP client raises when the server closes the connection mid-file, after its retries."""


@pytest.mark.parametrize("error, words", [(OSError(28, "No space left on device"), ["no space left", "HF_HOME"]),
                                          (PermissionError(13, "Permission denied"), ["failed", "Permission denied"]),
                                          (RemoteProtocolError("peer closed"), ["interrupted", "run again"])])
def test_a_full_disk_or_a_failed_transfer_is_one_line(error, words, job, hub, no_model, monkeypatch, tmp_path):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    err = one_line_error(*cli([*job, "--weights", REF, "--output", tmp_path / "o.png"]))
    assert all(w in err for w in words), err


# ------------------------------------------------------------------------------------- paths in configurations


def test_relative_paths_in_a_config_file_are_relative_to_that_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text("model:\n  weights: ../w/model.safetensors\n  vae: none\n"
                                               f"  local_dir: models\n  hparams: {TINY_WEIGHTS}\n"
                                               "batch:\n  cache: inversions\n")
    monkeypatch.chdir(tmp_path / "cfg")
    cfg = load_config(Path("run.yaml"), dotlist=[])
    assert cfg.model.weights == str(tmp_path / "cfg" / ".." / "w" / "model.safetensors")
    assert cfg.model.local_dir == str(tmp_path / "cfg" / "models") and cfg.model.vae is None
    assert cfg.model.hparams == str(TINY_WEIGHTS)  # absolute: unchanged
    assert cfg.batch.cache == str(tmp_path / "cfg" / "inversions")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(tmp_path / "cfg" / "run.yaml").model.local_dir == str(tmp_path / "cfg" / "models")
    assert load_config(None, dotlist=["model.weights=w.safetensors"]).model.weights == "w.safetensors"  # cwd's


def test_the_defaults_are_package_data():
    from importlib import resources

    text = resources.files("configs").joinpath("magicstyle.yaml").read_text()
    assert "weights: hf:SG161222/" in text and (resources.files("configs") / "model" / "sd15.yaml").is_file()
    assert tree(ROOT / "configs").keys() >= {"__init__.py", "magicstyle.yaml", "model/sd15.yaml"}
