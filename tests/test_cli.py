"""Tests for train_free_run.py, the command line: output PNG and its parameters, the report, determinism, option
resolution, and errors (one line on stderr, exit status 2, nothing written, before the model is loaded).

Runs are in-process (``train_free_run.main``), on the tiny random SD1.5 fixture.  Only two real runs happen: one
in-process (shared by several tests through a module fixture) and one in a subprocess, which must give the same
pixels.  Tests of option handling replace the model by a stub, so they take milliseconds.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import magicstyle
import magicstyle.pipeline as pipeline
import train_free_run
from _tiny import ASTRONAUT, TINY_WEIGHTS, gradient, tree, write_config
from conftest import ROOT
from magicstyle.config import load_config
from models.hub import file_name

STEPS = 2
DEFAULT_WEIGHTS = Path("weights") / file_name(load_config().model.weights)  # the default's local copy


def cli(argv) -> int:
    """``main`` as the shell sees it: the exit status, also when argparse exits."""
    try:
        return train_free_run.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def parameters(path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["parameters"])


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


# ------------------------------------------------------------------------------------------------------ a real run

REAL_OPTIONS = ["--alpha", "0.7", "--seed", "5", "inversion.sample_posterior=true"]  # the seed matters


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    content = gradient(tmp / "portrait.png", (80, 64))
    config = write_config(tmp / "run.yaml", steps=STEPS)
    output, report = tmp / "out" / "result.png", tmp / "out" / "report.json"
    argv = ["--content", content, "--style", ASTRONAUT, "--config", config, *REAL_OPTIONS]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli([*argv, "--output", output, "--report", report, "--quiet"])
    return SimpleNamespace(tmp=tmp, argv=argv, rc=rc, err=err.getvalue(), output=output, report=report)


def test_run_writes_a_png_with_its_parameters(real_run):
    assert real_run.rc == 0, real_run.err
    assert real_run.err == ""  # --quiet
    assert sorted(p.name for p in real_run.output.parent.iterdir()) == ["report.json", "result.png"]  # no temp files
    with Image.open(real_run.output) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
    p = parameters(real_run.output)
    assert {"config", "seed", "checkpoint", "checkpoint_sha256", "version"} <= p.keys()
    assert keys(p["config"]) == keys(OmegaConf.to_container(load_config()))  # every key, resolved
    c = p["config"]
    assert c["size"] == 64 and c["steps"] == STEPS and c["seed"] == 5 and p["seed"] == 5
    assert c["model"]["weights"] == str(TINY_WEIGHTS.resolve()) and c["model"]["dtype"] == "float32"
    assert c["inversion"]["sample_posterior"] is True
    assert c["ffa"]["alpha"] == 0.7 and c["ffa"]["beta"] == pytest.approx(0.3)  # --alpha alone sets beta
    assert p["checkpoint"] == TINY_WEIGHTS.name
    assert p["checkpoint_sha256"] == hashlib.sha256(TINY_WEIGHTS.read_bytes()).hexdigest()[:10]
    assert len(p["checkpoint_sha256"]) == 10 and all(ch in "0123456789abcdef" for ch in p["checkpoint_sha256"])
    assert p["version"] == magicstyle.__version__


def test_run_writes_its_report(real_run):
    assert real_run.rc == 0, real_run.err
    r = json.loads(real_run.report.read_text())
    assert {"load", "encode", "invert", "generate", "decode", "write"} <= r["seconds"].keys()
    assert all(isinstance(s, float) and s >= 0 for s in r["seconds"].values())
    assert r["seconds"]["write"] > 0  # the PNG, written by the background writer (magicstyle/writer.py)
    # memory mode: inversion is 1 call per step (guidance 1), generation 1 batched (cond + uncond) call per step
    assert r["unet_evals"] == 2 * STEPS
    assert r["unet_rows"] == 2 * STEPS + 2 * STEPS
    assert r["feature_store_bytes"] > 0 and r["peak_rss_bytes"] > 0


def test_the_command_runs_end_to_end_and_is_deterministic(real_run, tmp_path):
    """The one subprocess test: the real command, then a real error.  Same inputs and seed -> the same pixels."""
    assert real_run.rc == 0, real_run.err
    output = tmp_path / "again.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "train_free_run.py", *map(str, real_run.argv), "--output", str(output)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and f"wrote {output}" in run.stderr
    if json.loads(real_run.report.read_text())["device"] == "cpu":  # README: on the CPU, the same pixels
        np.testing.assert_array_equal(pixels(output), pixels(real_run.output))
    else:  # a GPU (device: auto) promises no bit-exact repeats, and the subprocess runs with PyTorch's default TF32
        # convolutions (the tests turn them off): a 10-bit mantissa, like float16, which moves this image by 1.7
        # levels on average on the CPU
        assert np.abs(pixels(output).astype(int) - pixels(real_run.output)).mean() <= 6
    assert parameters(output) == parameters(real_run.output)

    missing = tmp_path / "missing.png"
    run = subprocess.run([sys.executable, "train_free_run.py", "--content", str(missing), "--style", str(ASTRONAUT),
                          "--output", str(tmp_path / "never.png")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("error:") and "Traceback" not in run.stderr
    assert str(missing) in run.stderr and "does not exist" in run.stderr
    assert not (tmp_path / "never.png").exists()


def test_another_seed_gives_another_image(real_run):
    """With inversion.sample_posterior=true the seed draws the latents: seed 5 repeats (the subprocess test above, bit
    for bit on the CPU), seed 6 gives other pixels (measured: 38 levels of 255 on average; a repeat differs by 0)."""
    assert real_run.rc == 0, real_run.err
    output = real_run.tmp / "seed6.png"
    argv = [a if a != "5" else "6" for a in real_run.argv]
    assert argv.count("6") == 1 and argv[argv.index("6") - 1] == "--seed"
    assert cli([*argv, "--output", output, "--quiet"]) == 0
    assert parameters(output)["seed"] == 6
    assert np.abs(pixels(output).astype(int) - pixels(real_run.output)).mean() > 10


def test_a_separate_vae_decodes_the_result(real_run):
    """--vae: the given VAE replaces the checkpoint's.  Here it is the checkpoint's own VAE with the decoder's output
    convolution halved, so the pixels move halfway to grey and everything else stays."""
    from _ckpt_helpers import tiny_state, with_prefix, write
    from models.loader import VAE_PREFIX

    assert real_run.rc == 0, real_run.err
    vae = with_prefix(tiny_state(), VAE_PREFIX, VAE_PREFIX)
    for k in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
        vae[VAE_PREFIX + k] = vae[VAE_PREFIX + k] * 0.5
    vae_file = write(real_run.tmp / "half.safetensors", vae)
    output = real_run.tmp / "half.png"
    assert cli([*real_run.argv, "--vae", vae_file, "--output", output, "--quiet"]) == 0
    p = parameters(output)
    assert p["vae"] == "half.safetensors" and p["config"]["model"]["vae"] == str(vae_file)
    full, half = pixels(real_run.output).astype(float), pixels(output).astype(float)
    inside = (full > 2) & (full < 253)  # not clamped at 0 or 255
    assert inside.mean() > 0.5
    assert np.abs(half - (127.5 + (full - 127.5) / 2))[inside].max() <= 2


# ------------------------------------------------------------------------------------------ option handling (stub)


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "in").mkdir()
    return SimpleNamespace(
        tmp=tmp_path,
        content=gradient(tmp_path / "in" / "portrait.png", (80, 64)),
        style=gradient(tmp_path / "in" / "starry.jpg", (64, 80), flip=True),
        config=write_config(tmp_path / "in" / "run.yaml", steps=STEPS),
        output=tmp_path / "out" / "result.png",
    )


def argv(t, *extra, content=None, style=None, config=None, output=None, quiet=True) -> list:
    a = ["--content", content or t.content, "--style", style or t.style, "--config", config or t.config,
         "--output", output or t.output]
    return a + (["--quiet"] if quiet else []) + list(extra)


@pytest.fixture
def fake_model(monkeypatch):
    """The model replaced by a stub: records the config FFF gets and gives a flat image."""
    seen = {}

    def load_model(cfg, jobs=1):
        seen["load"] = cfg
        return object()

    class Inversion:  # what the runner asks of one: cut it into images and merge them
        store = SimpleNamespace(nbytes=0)

        def select(self, indices):
            return self

        @staticmethod
        def cat(parts):
            return parts[0]

    def csdi(sd, z0, cfg, *, progress=None, stats=None):
        stats.update(invert_unet_calls=0, invert_unet_rows=0)
        return Inversion()

    def fff(sd, inversion, cfg, pairs, *, diagnostics=None, progress=None, stats=None):
        seen["cfg"] = cfg
        stats.update(generate_unet_calls=0, generate_unet_rows=0)
        return torch.zeros(len(pairs), 4, cfg.size // 8, cfg.size // 8)

    monkeypatch.setattr(pipeline, "load_model", load_model)
    monkeypatch.setattr(pipeline, "encode_images", lambda sd, images, generator=None: images)
    monkeypatch.setattr(pipeline, "csdi", csdi)
    monkeypatch.setattr(pipeline, "Inversion", Inversion)
    monkeypatch.setattr(pipeline, "fff", fff)
    flat = lambda sd, z: torch.full((len(z), 3, 8 * z.shape[2], 8 * z.shape[3]), -0.9)  # noqa: E731
    monkeypatch.setattr(pipeline, "decode_latents", flat)
    return seen


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load the model fails the test: input errors must be found before."""
    def load_model(cfg, jobs=1):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(pipeline, "load_model", load_model)
    monkeypatch.setattr(pipeline, "csdi", lambda *a, **k: pytest.fail("the run started"))


def test_default_output_name(fake_model, inputs, monkeypatch, capsys):
    work = inputs.tmp / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree(inputs.tmp)
    assert cli(["--content", inputs.content, "--style", inputs.style, "--config", inputs.config, "--quiet"]) == 0
    written = set(tree(inputs.tmp)) - set(before)
    assert written == {"work/outputs/portrait_starry.png"}  # relative to the current folder, not the content's
    with Image.open(work / "outputs" / "portrait_starry.png") as img:
        assert img.format == "PNG" and img.size == (64, 64)
    assert capsys.readouterr().err == ""


def test_beta_alone_sets_alpha_and_overrides_apply(fake_model, inputs):
    assert cli(argv(inputs, "--beta", "0.4", "ffa.layers=all", "store.mode=recompute")) == 0
    c = parameters(inputs.output)["config"]
    assert c["ffa"]["beta"] == 0.4 and c["ffa"]["alpha"] == pytest.approx(0.6)
    assert c["ffa"]["layers"] == "all" and c["store"]["mode"] == "recompute"
    cfg = fake_model["cfg"]  # what the pipeline was given
    assert cfg.ffa.layers == "all" and cfg.store.mode == "recompute" and cfg.ffa.alpha == pytest.approx(0.6)


def test_flags_override_the_config_file_and_key_value_overrides_come_last(fake_model, inputs):
    assert cli(argv(inputs, "--size", "128", "--steps", "5", "steps=3", "--alpha", "0.5", "--beta", "0.25")) == 0
    c = parameters(inputs.output)["config"]
    assert c["size"] == 128 and c["steps"] == 3 and (c["ffa"]["alpha"], c["ffa"]["beta"]) == (0.5, 0.25)
    with Image.open(inputs.output) as img:
        assert img.size == (128, 128)


def test_overwrite_replaces_the_output(fake_model, inputs):
    inputs.output.parent.mkdir()
    inputs.output.write_bytes(b"an old result")
    assert cli(argv(inputs, "--overwrite")) == 0
    assert list(tree(inputs.output.parent)) == ["result.png"]  # replaced in place, no temp file left
    assert parameters(inputs.output)["config"]["size"] == 64


def test_help(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--content" in out and "key=value" in out


# ------------------------------------------------------------------------------------------------------- errors


def text_file(t, name="notes.png"):
    (t.tmp / "in" / name).write_text("not an image\n")
    return t.tmp / "in" / name


def corrupt_weights(t):
    (t.tmp / "in" / "corrupt.safetensors").write_bytes(b"\x01" + random.Random(0).randbytes(4095))
    return t.tmp / "in" / "corrupt.safetensors"


def existing(path, data=b"precious"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def config_with(t, text):
    return write_config(t.tmp / "in" / "extra.yaml", steps=STEPS, extra=text)


ERRORS = [  # id, argv (may create files), words the message must contain, whether the real loader runs
    ("missing content", lambda t: argv(t, content=t.tmp / "in" / "missing.png"), ["missing.png", "does not exist; check the path"]),
    ("missing style", lambda t: argv(t, style=t.tmp / "in" / "gone.jpg"), ["gone.jpg", "does not exist"]),
    ("a key and value without =", lambda t: [*argv(t), "--style", t.style, "ffa.beta", "0.3"],
     ["--style ffa.beta", "no such image", "KEY=VALUE", "ffa.beta=0.3"]),
    ("a mistyped folder", lambda t: argv(t, content=t.tmp / "portraits"), ["portraits", "check the path"]),
    ("content folder without images", lambda t: argv(t, content=existing(t.tmp / "in" / "docs" / "a.txt").parent),
     ["docs", "holds no images"]),
    ("unreadable image", lambda t: argv(t, content=text_file(t)), ["notes.png", "cannot read image"]),
    ("missing weights", lambda t: argv(t, f"model.weights={t.tmp / 'nope.safetensors'}"),
     ["nope.safetensors", "not found", "weights/README.md"]),
    ("missing --weights", lambda t: argv(t, "--weights", t.tmp / "nope.safetensors"),
     ["nope.safetensors", "weights/README.md"]),
    ("--weights is a folder", lambda t: argv(t, "--weights", existing(t.tmp / "in" / "ckpt" / "m.safetensors").parent),
     ["model.weights", "ckpt is a folder", "give the .safetensors file inside it", "m.safetensors"]),
    ("--vae is a folder", lambda t: argv(t, "--vae", t.tmp / "in"), ["model.vae", "is a folder", ".safetensors"]),
    ("--config is a folder", lambda t: argv(t, config=t.tmp / "in"), ["config file", "is a folder", "YAML file"]),
    ("default weights absent", lambda t: argv(t, config=write_config(t.tmp / "in" / "d.yaml", weights=None)),
     [DEFAULT_WEIGHTS.name, "weights/README.md"]),
    ("alpha 1.5", lambda t: argv(t, "--alpha", "1.5"), ["ffa.alpha", "1.5"]),
    ("beta -0.1", lambda t: argv(t, "--beta", "-0.1"), ["ffa.beta", "-0.1"]),
    ("steps 0", lambda t: argv(t, "--steps", "0"), ["steps", "0"]),
    ("size 100", lambda t: argv(t, "--size", "100"), ["size", "multiple of 64", "100"]),
    ("size 0", lambda t: argv(t, "--size", "0"), ["size", "0"]),
    ("size not a number", lambda t: argv(t, "--size", "big"), ["--size", "big"]),
    ("unknown override key", lambda t: argv(t, "ffa.gamma=1"), ["gamma"]),
    ("unknown key in --config", lambda t: argv(t, config=config_with(t, "ffa:\n  gamma: 1\n")), ["gamma"]),
    ("unknown top-level key in --config", lambda t: argv(t, config=config_with(t, "sise: 64\n")), ["sise"]),
    ("override without =", lambda t: argv(t, "ffa.beta"), ["ffa.beta", "key=value"]),
    ("override of the wrong type", lambda t: argv(t, "steps=many"), ["steps"]),
    ("missing --config", lambda t: argv(t, config=t.tmp / "in" / "nope.yaml"), ["nope.yaml", "does not exist", "leave --config out"]),
    ("bad YAML", lambda t: argv(t, config=existing(t.tmp / "in" / "bad.yaml", b"size: [64\n")), ["bad.yaml", "YAML"]),
    ("existing output", lambda t: argv(t, output=existing(t.output)), ["result.png", "exists", "--overwrite"]),
    ("existing report", lambda t: argv(t, "--report", existing(t.tmp / "out" / "r.json")), ["r.json", "--overwrite"]),
    ("output not a PNG", lambda t: argv(t, output=t.tmp / "out" / "x.jpg"), ["x.jpg", "ending in .png", "x.png"]),
    ("output is a folder", lambda t: argv(t, "--overwrite", output=existing(t.output / "x").parent),
     ["result.png", "folder"]),
    ("batch.cache is a file", lambda t: argv(t, f"batch.cache={existing(t.tmp / 'in' / 'c.bin')}"),
     ["batch.cache", "c.bin", "is a file", "give a folder"]),
    ("corrupt weights", lambda t: argv(t, "--weights", corrupt_weights(t)),
     ["corrupt.safetensors", "weights/README.md"], True),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in ERRORS])
def test_errors(case, inputs, monkeypatch, capsys, request):
    name, make, words, *real = case
    if name == "default weights absent" and DEFAULT_WEIGHTS.exists():
        pytest.skip("the default weights are installed")
    if real:  # the loader itself must refuse the file
        monkeypatch.setattr(pipeline, "csdi", lambda *a, **k: pytest.fail("the run started"))
    else:
        request.getfixturevalue("no_model")
    args = make(inputs)
    before, output_existed = tree(inputs.tmp), inputs.output.exists()
    assert cli(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.endswith("\n") and err.startswith("error: "), err
    for word in words:
        assert word in err, err
    if name == "a mistyped folder":  # the KEY=VALUE hint is for a forgotten `=`, not for every missing path
        assert "KEY=VALUE" not in err, err
    assert tree(inputs.tmp) == before  # nothing written, nothing replaced, no temporary file left
    assert inputs.output.exists() == output_existed


# ------------------------------------------------------------------------------------------------ regressions


def test_error_after_a_note_is_still_one_line(no_model, inputs, capsys):
    existing(inputs.output)
    assert cli(argv(inputs, quiet=False)) == 2  # 80x64 and 64x80 inputs: two notes
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_output_folder_that_cannot_be_made(no_model, inputs, capsys):
    existing(inputs.tmp / "blocker")
    assert cli(argv(inputs, output=inputs.tmp / "blocker" / "result.png")) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "blocker" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, which takes no new files")
@pytest.mark.parametrize("option", ["--output", "--report"])
def test_a_place_that_takes_no_files_is_refused_before_the_run(no_model, inputs, capsys, option):
    """/proc passes a permission check (as root too) but takes no new file: a probe file finds that out."""
    target = "/proc/magicstyle-x.png" if option == "--output" else "/proc/magicstyle-r.json"
    assert cli([*argv(inputs), option, target]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {option} {target} cannot be written"), err
    assert "choose a place you can write to" in err
    if os.geteuid() == 0:  # as root the permission bits allow it: only the probe file finds it out
        assert "does not take new files" in err, err


def test_an_unused_inversion_cache_is_noted(fake_model, inputs, capsys):
    folder = inputs.tmp / "cache"
    assert cli(argv(inputs, f"batch.cache={folder}", quiet=False)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "batch.cache" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: batch.cache {folder} is not used in memory mode"), notes
    assert "batch.cache_features=true" in notes[0] and "store.mode=recompute" in notes[0]
    assert not folder.exists()  # (with either setting the cache is used: magicstyle/cache.py enabled)


def test_alpha_alone_records_a_round_beta(fake_model, inputs):
    assert cli(argv(inputs, "--alpha", "0.7")) == 0
    assert parameters(inputs.output)["config"]["ffa"]["beta"] == 0.3


@pytest.mark.parametrize("given, alpha, beta", [
    (["ffa.beta=0.3"], 0.7, 0.3), (["ffa.alpha=0.6"], 0.6, 0.4),  # one key=value sets the other, as --beta does
    (["ffa.alpha=0.5", "ffa.beta=0.25"], 0.5, 0.25), (["--alpha", "0.5", "ffa.beta=0.25"], 0.5, 0.25),  # both: kept
    (["--beta", "0.4", "ffa.beta=0.3"], 0.7, 0.3),  # the override is the beta given
])
def test_a_key_value_weight_follows_eq5_as_the_flags_do(fake_model, inputs, given, alpha, beta):
    assert cli(argv(inputs, *given)) == 0
    c = parameters(inputs.output)["config"]["ffa"]
    assert (c["alpha"], c["beta"]) == (alpha, beta)


def test_a_repeated_content_or_style_adds_to_the_list():
    args = train_free_run.parse_args(["--content", "a.png", "--style", "s.png", "--content", "b.png", "c.png",
                                      "--style", "t.png", "ffa.beta=0.3", "--sweep", "x=1", "--sweep", "y=2"])
    assert (args.content, args.style, args.overrides) == (["a.png", "b.png", "c.png"], ["s.png", "t.png"],
                                                          ["ffa.beta=0.3"])
    assert args.sweep == ["x=1", "y=2"]


def test_overrides_may_be_interleaved_with_options(fake_model, inputs):
    assert cli(["steps=3", *argv(inputs), "size=128"]) == 0
    assert parameters(inputs.output)["config"]["size"] == 128


def test_a_broken_checkpoint_with_non_square_images_prints_one_line(inputs, monkeypatch, capsys):
    """The resize notes come only once the model has loaded: a bad checkpoint is one line, not notes + error."""
    monkeypatch.setattr(pipeline, "csdi", lambda *a, **k: pytest.fail("the run started"))
    assert cli(argv(inputs, "--weights", corrupt_weights(inputs), quiet=False)) == 2  # 80x64 and 64x80 inputs
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "corrupt.safetensors" in err, err


def test_non_square_images_are_noted_once_the_run_starts(fake_model, inputs, capsys):
    assert cli(argv(inputs, quiet=False)) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "note: portrait.png is 80x64; it is resized and centre-cropped to 64x64"
    assert err[1] == "note: starry.jpg is 64x80; it is resized and centre-cropped to 64x64"
    assert err[-1] == f"wrote {inputs.output}"
