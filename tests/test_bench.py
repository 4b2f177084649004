"""bench/: the headings, and every section a GPU session runs (bench/gpu_session.sh), run end to end on the CPU with
the tiny checkpoint, so that a typo costs a test here and not the session's few minutes of device time.  The figures
themselves need a full-size checkpoint and a GPU: run by hand, see bench/README.md."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_HPARAMS, TINY_WEIGHTS, needs_compile

SESSION, WHEELS = ROOT / "bench" / "gpu_session.sh", ROOT / "bench" / "gpu_wheels.sh"


@pytest.fixture
def bench(monkeypatch):
    """bench/ importable as ``python bench/benchmark.py`` makes it (sys.path restored after), its checkpoints the tiny
    one (``common.HPARAMS``) and the GPU sections on the CPU (``gpu_bench.DEVICE``)."""
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench"), *sys.path])
    import benchmark
    import common
    import gpu_bench

    monkeypatch.setattr(common, "HPARAMS", TINY_HPARAMS)
    monkeypatch.setattr(gpu_bench, "DEVICE", torch.device("cpu"))
    return benchmark


def test_store_heading_names_the_store_dtype(bench, monkeypatch):
    """The feature-store bytes are in store.dtype (float16 by default), whatever dtype the model runs in."""
    import pipeline_bench

    monkeypatch.setattr(pipeline_bench, "store_section", lambda weights, dtype: ["| rows |"])
    heading = bench.store_section(ROOT / "unused.safetensors", dtype="bfloat16")[0]
    assert heading == "Feature store, store.dtype float16 (model dtype bfloat16)"


# ---------------------------------------------------------------------------------------------------------------------
# The --device cuda sections (bench/gpu_bench.py), on the CPU


def tiny_unet(dtype: torch.dtype):
    """A two-level UNet (random weights) with SD1.5's context width, for the UNet section's (B, 77, 768) context."""
    from models.config import SD15Config
    from models.unet import UNet

    torch.manual_seed(0)
    config = SD15Config(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,))
    return UNet(config).to(dtype).eval().requires_grad_(False)


@needs_compile  # model.compile=true is part of the run (through a stand-in for torch.compile)
def test_gpu_sections_run_end_to_end_on_the_cpu(bench, monkeypatch, tmp_path, capsys):
    """Every section of ``--device cuda`` as bench/gpu_session.sh calls them (with --results kept between the calls),
    with DEVICE the CPU, the tiny checkpoint at 64 px and 2 steps, and a tiny UNet in the UNet section.  diffusers is
    made absent (its column says '-'); ``torch.compile`` is a stand-in that returns the module, so that the compiled
    rows and ``model.compile=true`` run through gpu_bench's code in seconds (compiling itself: tests/test_compiled.py
    on the CPU, tests/test_gpu_fastpath.py with CUDA graphs; Inductor's C++ build takes minutes here)."""
    import common
    import gpu_bench

    monkeypatch.setattr(common, "random_unet", tiny_unet)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `from diffusers import ...` raises ImportError
    monkeypatch.setattr(torch, "compile", lambda module, **options: module)
    monkeypatch.setattr(gpu_bench, "cli_section", functools.partial(gpu_bench.cli_section, runs=1))
    results = tmp_path / "results.json"
    common_args = ["--device", "cuda", "--weights", str(TINY_WEIGHTS), "--size", "64", "--steps", "2",
                   "--latent", "8", "--dtypes", "float16", "bfloat16", "--batches", "2", "--results", str(results)]

    handler = signal.getsignal(signal.SIGTERM)
    gpu_bench.main(bench.parse_args(common_args + ["--unet", "--pipeline"]))  # part 1 (model.compile false and true)
    assert signal.getsignal(signal.SIGTERM) is handler  # main's own handler (for `timeout`) is gone after
    first = json.loads(results.read_text())
    assert set(first) == {"unet", "stylize"}
    assert set(first["unet"]) == {"float16/2", "bfloat16/2"}
    assert first["unet"]["float16/2"]["compiled"] > 0 and first["unet"]["bfloat16/2"]["compiled"] is None
    assert all(r["diffusers"] is None for r in first["unet"].values())
    assert set(first["stylize"]) == {f"{c}/{m}" for c in ("false", "true") for m in ("memory", "recompute")}
    assert all(r["peak"] == 0 and r["steady"] > 0 for r in first["stylize"].values())  # no GPU memory off CUDA
    out = capsys.readouterr().out
    assert "| float16 | 2 | eager " in out and "| float16 | 2 | compiled " in out
    unet_rows = [line for line in out.splitlines() if line.startswith(("| float16 | 2 |", "| bfloat16 | 2 |"))]
    assert len(unet_rows) == 3 and all(line.split(" | ")[3:5] == ["-", "-"] for line in unet_rows)  # no diffusers

    gpu_bench.main(bench.parse_args(common_args + ["--cli", "--load", "--no-compile"]))  # part 2: a real subprocess
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert "| pinned, asynchronous |" in out and "| plain Tensor.to |" in out
    final = json.loads(results.read_text())
    assert final["unet"] == first["unet"] and final["stylize"] == first["stylize"]  # read back, kept
    assert set(final["cli"]) == {"false"} and final["cli"]["false"] > 0

    table = gpu_bench.summary_table(final)
    assert "\n".join(table) in out  # the summary printed last covers both calls
    assert len(table) == 2 + 2 + 4 + 1 + 1  # header, UNet float16 and bfloat16, stylize x 4, CLI, peak memory
    assert table[2].startswith("| UNet forward batch 2, bfloat16 | eager ")
    assert table[3].startswith("| UNet forward batch 2, float16 | compiled ")
    assert table[-2].startswith("| `train_free_run.py` one-shot, model.compile=false |")


def test_a_time_limit_keeps_what_was_measured(bench, monkeypatch, tmp_path, capsys):
    """``timeout`` (SIGTERM) during a section: exit status 124, the sections before it in ``--results`` and the
    summary."""
    import gpu_bench

    def unet_section(*args, summary, **options):
        summary["float16/2"] = {"eager": 30.0, "diffusers": None, "compiled": None}
        return ["| rows |"]

    monkeypatch.setattr(gpu_bench, "unet_section", unet_section)
    monkeypatch.setattr(gpu_bench, "stylize_section", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    results = tmp_path / "results.json"
    with pytest.raises(SystemExit) as stopped:
        gpu_bench.main(bench.parse_args(["--device", "cuda", "--weights", str(TINY_WEIGHTS), "--unet", "--pipeline",
                                         "--results", str(results)]))
    assert stopped.value.code == 124
    assert json.loads(results.read_text()) == {"unet": {"float16/2": {"eager": 30.0, "diffusers": None,
                                                                      "compiled": None}}, "stylize": {}}
    assert "| UNet forward batch 2, float16 | eager 30.0 ms |" in capsys.readouterr().out


def test_unet_section_against_diffusers(bench, monkeypatch):
    """The diffusers column (the session carries diffusers' wheel), with a two-level diffusers UNet for SD1.5's."""
    diffusers = pytest.importorskip("diffusers")
    import common
    import gpu_bench

    full = diffusers.UNet2DConditionModel

    def small(**config):  # what gpu_bench asks for (SD1.5's UNet), with two levels of 32 and 64 channels
        return full(**config, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

    monkeypatch.setattr(diffusers, "UNet2DConditionModel", small)
    monkeypatch.setattr(common, "random_unet", tiny_unet)
    summary = {}
    rows = gpu_bench.unet_section(["float16"], [2], latent=8, rounds=1, runs=1, compile=False, summary=summary)
    cells = rows[-1].split(" | ")
    assert cells[:2] == ["| float16", "2"] and cells[2].startswith("eager ") and cells[4].endswith("x")
    assert summary["float16/2"]["diffusers"] == pytest.approx(float(cells[3]), abs=0.05)
    assert "; diffusers eager " in gpu_bench.summary_table({"unet": summary})[2]


# ---------------------------------------------------------------------------------------------------------------------
# bench/gpu_session.sh's command lines


def session_commands(script: Path, part: str, tmp_path: Path) -> list[list[str]]:
    """The argument lists of every ``python3`` command ``script`` runs for ``part``, as bash expands them: the script
    runs with stand-ins for python3 (logs its arguments), timeout (runs the rest) and nvidia-smi, in an empty folder."""
    bin_, work, log = tmp_path / "bin", tmp_path / "work", tmp_path / f"commands{part}.log"
    bin_.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    stand_ins = {"python3": 'printf "%s\\0" "$@" >> "$LOG"; printf "\\n" >> "$LOG"', "timeout": 'shift; exec "$@"',
                 "nvidia-smi": "exit 0"}
    for name, body in stand_ins.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "LOG": str(log)}
    done = subprocess.run(["bash", str(script), part], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [line.split("\0")[:-1] for line in log.read_text().splitlines()]


def benchmark_lines(script: Path, tmp_path: Path) -> list[list[str]]:
    return [c[1:] for part in ("1", "2") for c in session_commands(script, part, tmp_path)
            if c[0] == "bench/benchmark.py"]


def test_every_benchmark_command_of_the_gpu_session_parses(bench, tmp_path):
    lines = benchmark_lines(SESSION, tmp_path)
    parsed = [bench.parse_args(argv) for argv in lines]  # a flag benchmark.py does not know: SystemExit(2)
    sections = [next(s for s in ("unet", "pipeline", "cli", "batch", "load") if getattr(a, s)) for a in parsed]
    assert sections == ["unet", "pipeline", "cli", "batch", "load", "batch"]
    assert all(a.weights == Path("/tmp/sd15_random.safetensors") for a in parsed)
    assert all(a.results.name == "results.json" for a in parsed if not a.batch)
    assert [(a.grid, a.compile, a.pairs) for a in parsed if a.batch] == [((6, 6), "auto", "auto"),
                                                                          ((8, 4), "true", "4")]


def test_a_misspelt_flag_in_the_gpu_session_fails_the_check(bench, tmp_path):
    script = tmp_path / "gpu_session.sh"
    script.write_text(SESSION.read_text().replace("--no-warm", "--no-wram"))
    lines = benchmark_lines(script, tmp_path)
    with pytest.raises(SystemExit) as failed:
        for argv in lines:
            bench.parse_args(argv)
    assert failed.value.code == 2


@pytest.mark.parametrize("script", [SESSION, WHEELS], ids=lambda p: p.name)
def test_gpu_scripts_are_valid_bash(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)  # one file per `bash -n`
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------------------------------
# --batch (bench/batch_bench.py), as gpu_session.sh part 2 runs it


def test_batch_section_runs_a_grid(bench, capsys):
    """A 2 x 2 grid through the command line's runner in batches of 4 pairs, cold then warm (the inversion cache);
    batch_bench itself checks the report's jobs and UNet rows against the formula.  The runner's device is auto: a
    GPU where there is one."""
    bench.main(["--batch", "--grid", "2x2", "--size", "64", "--steps", "2", "--dtype", "float32", "--compile", "false",
                "--pairs", "4", "--weights", str(TINY_WEIGHTS)])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines() if line.startswith("| cold |")
            or line.startswith("| warm |")}
    assert set(rows) == {"| cold", "| warm"}
    assert rows["| cold"][1:3] == ["4", "4"] and rows["| cold"][5] == str(2 * (2 + 2) + 2 * 2 * 4)  # rows: formula
    assert rows["| warm"][5] == str(2 * 2 * 4)  # nothing inverted again
    assert (rows["| cold"][10] == "-") == (not torch.cuda.is_available())  # peak CUDA memory: none on the CPU
