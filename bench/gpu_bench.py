"""The GPU sections of ``bench/benchmark.py --device cuda`` (issue 11): every figure of the issue's table.

    python bench/benchmark.py --device cuda --weights /tmp/sd15_random.safetensors

Sections, each printed as soon as it is measured: the UNet forward (ours eager, ours compiled, diffusers eager when
diffusers is importable, alternated in one process), loading (pinned against plain), ``stylize`` steady state in both
store modes with ``model.compile`` off and on, the one-shot CLI's wall clock, and peak GPU memory; then the summary
table against the targets.  GPU times are wall-clock with ``torch.cuda.synchronize()``.

Every section runs on ``DEVICE``; tests/test_bench.py points it at the CPU (and ``common.HPARAMS`` at the tiny test
checkpoint) to run them all end to end, so that a GPU session's short device time is not spent on a typo.
"""
from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

ROOT = Path(__file__).resolve().parents[1]
CONTENT, STYLE = ROOT / "examples" / "astronaut.png", ROOT / "examples" / "hubble_deep_field.jpg"
DEVICE = torch.device("cuda")  # where every section runs (the CPU in tests/test_bench.py)


def on_cuda() -> bool:
    return DEVICE.type == "cuda"


def timed(fn) -> float:
    """Seconds of ``fn()`` on ``DEVICE``, synchronised before and after on a GPU (its calls return before their
    kernels have run)."""
    if on_cuda():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if on_cuda():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def reset_peak() -> None:
    if on_cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int:
    """Peak GPU memory since ``reset_peak()``; 0 off CUDA."""
    return torch.cuda.max_memory_allocated() if on_cuda() else 0


def free_memory() -> None:
    if on_cuda():
        torch.cuda.empty_cache()


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


# ---------------------------------------------------------------------------------------------------------------------
# UNet


def diffusers_unet(dtype: torch.dtype):
    """diffusers' SD1.5 ``UNet2DConditionModel`` (default SDPA processor) with its own random weights, or None."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return None
    with torch.device(DEVICE):  # built on the GPU: seconds less than a float32 model on the CPU, then moved
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return unet.to(DEVICE, dtype).eval().requires_grad_(False)


def unet_inputs(batch: int, dtype: torch.dtype, latent: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, device=DEVICE, dtype=dtype, generator=g)
    t = torch.linspace(999, 1, batch, device=DEVICE).long()
    return x, t, torch.randn(batch, 77, 768, device=DEVICE, dtype=dtype, generator=g)


@torch.no_grad()
def unet_section(dtypes, batches, *, latent: int, rounds: int, runs: int, compile: bool, summary: dict) -> list[str]:
    """Eager rows for every dtype and batch first (ours and diffusers alternated), then ours compiled in float16
    (each shape compiles for about a minute, so a time limit cuts these last)."""
    from magicstyle.compiled import CompiledUNet

    rows = ["| dtype | batch | ours ms | diffusers ms | diffusers / ours | compile + warm-up s | peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- |"]

    def row(name, batch, label, ms, d, warm):
        rows.append(f"| {name} | {batch} | {label} {ms:.1f} | {f'{d:.1f}' if d else '-'} "
                    f"| {f'{d / ms:.2f}x' if d else '-'} | {f'{warm:.0f}' if warm else '-'} "
                    f"| {gib(peak_bytes())} |")
        print(rows[-1], file=sys.stderr, flush=True)

    for name in dtypes:
        dtype = getattr(torch, name)
        ours, theirs = common.random_unet(dtype).to(DEVICE), diffusers_unet(dtype)
        for batch in batches:
            x, t, ctx = unet_inputs(batch, dtype, latent)
            reset_peak()
            eager, ref = [], []
            for fn in [lambda: ours(x, t, ctx)] + ([lambda: theirs(x, t, ctx)] if theirs else []):
                timed(fn)  # warm-up (cuDNN/cuBLAS heuristics)
            for _ in range(rounds):  # alternated, so that both see the same clocks
                eager.append(statistics.median(timed(lambda: ours(x, t, ctx)) for _ in range(runs)))
                if theirs:
                    ref.append(statistics.median(timed(lambda: theirs(x, t, ctx)) for _ in range(runs)))
            e, d = statistics.median(eager) * 1e3, statistics.median(ref) * 1e3 if ref else None
            summary[f"{name}/{batch}"] = {"eager": e, "diffusers": d, "compiled": None}
            row(name, batch, "eager", e, d, None)
        ours = theirs = None  # freed before the next dtype (not del: the timing lambdas close over them)
        free_memory()
    if compile:
        name, dtype = "float16", torch.float16
        compiled = CompiledUNet(common.random_unet(dtype).to(DEVICE))
        for batch in batches:
            x, t, ctx = unet_inputs(batch, dtype, latent)
            reset_peak()
            warm = sum(timed(lambda: compiled(x, t, ctx)) for _ in range(3))  # compile, warm up, record the graph
            fast = statistics.median(timed(lambda: compiled(x, t, ctx)) for _ in range(runs * rounds)) * 1e3
            entry = summary.setdefault(f"{name}/{batch}", {"eager": None, "diffusers": None})
            entry["compiled"] = fast
            row(name, batch, "compiled", fast, entry["diffusers"], warm)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Loading, stylize, the one-shot CLI


def load_section(weights: Path, *, rounds: int = 2) -> list[str]:
    """load_sd15 to the GPU in float16 through pinned memory (models/upload.py) and through plain ``Tensor.to``."""
    import models.upload
    from models import load_sd15

    rows = ["| path | load s (median) |", "| --- | --- |"]
    seconds = {True: [], False: []}
    for _ in range(rounds):
        for pinned in (True, False):
            models.upload.PINNED = pinned
            seconds[pinned].append(timed(lambda: load_sd15(weights, device=DEVICE, dtype=torch.float16,
                                                           vae_dtype=torch.float32, hparams=common.HPARAMS)))
            free_memory()
    models.upload.PINNED = True
    rows += [f"| {'pinned, asynchronous' if p else 'plain Tensor.to'} | {statistics.median(s):.2f} |"
             for p, s in seconds.items()]
    return rows


def stylize_section(weights: Path, *, size: int, steps: int, calls: int, compile_settings, summary: dict) -> list[str]:
    from magicstyle import load_config, load_model, stylize

    rows = ["| model.compile | store.mode | first call s | steady s (call " + str(calls) + ") | compile s "
            "| peak GPU GiB |", "| --- | --- | --- | --- | --- | --- |"]
    for setting in compile_settings:
        model = {"weights": str(weights), "hparams": common.HPARAMS and str(common.HPARAMS), "device": DEVICE.type,
                 "dtype": "float16", "compile": {"true": True, "false": False}[setting]}
        sd = load_model(load_config(None, {"size": size, "steps": steps, "model": model}))
        for mode in ("memory", "recompute"):
            c = load_config(None, {"size": size, "steps": steps, "store": {"mode": mode}, "model": model})
            reset_peak()
            results = []
            for _ in range(calls):
                stats = {}
                wall = timed(lambda: stylize(CONTENT, STYLE, c, sd=sd, stats=stats))
                results.append((wall, stats["seconds"].get("compile", 0.0)))
            rows.append(f"| {setting} | {mode} | {results[0][0]:.2f} | {results[-1][0]:.3f} "
                        f"| {sum(r[1] for r in results):.0f} | {gib(peak_bytes())} |")
            print(rows[-1], file=sys.stderr, flush=True)
            summary[f"{setting}/{mode}"] = {"steady": results[-1][0], "peak": peak_bytes()}
        sd = None  # freed before the next setting (not del: the timing lambdas close over it)
        free_memory()
    return rows


def cli_section(weights: Path, *, size: int, steps: int, compile_settings, summary: dict, runs: int = 2) -> list[str]:
    """``train_free_run.py`` from a fresh process, as a user runs it: wall clock from start to PNG on disk."""
    rows = ["| model.compile | run | wall s | load s | compile s | invert s | generate s | peak GPU GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as folder:
        for setting in compile_settings:
            for run in range(1, runs + 1):
                out, report = Path(folder) / "out.png", Path(folder) / "report.json"
                command = [sys.executable, str(ROOT / "train_free_run.py"), "--content", str(CONTENT), "--style",
                           str(STYLE), "--weights", str(weights), "--output", str(out), "--report", str(report),
                           "--size", str(size), "--steps", str(steps), "--overwrite", "--quiet", "--device",
                           DEVICE.type, f"model.compile={setting}"]
                if common.HPARAMS:
                    command.append(f"model.hparams={common.HPARAMS}")
                start = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if done.returncode:
                    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                    rows.append(f"| {setting} | {run} | failed: {last} | | | | | |")
                    continue
                r = json.loads(report.read_text())
                s = r["seconds"]
                rows.append(f"| {setting} | {run} | {wall:.1f} | {s.get('load', 0):.1f} | {s.get('compile', 0):.1f} "
                            f"| {s.get('invert', 0):.2f} | {s.get('generate', 0):.2f} "
                            f"| {gib(r.get('peak_cuda_bytes', 0))} |")
                print(rows[-1], file=sys.stderr, flush=True)
                summary[setting] = wall  # the last run: checkpoint hash cached, files in the page cache
    return rows


# ---------------------------------------------------------------------------------------------------------------------


def summary_table(results: dict) -> list[str]:
    """The issue's table (what, measured, target) from the ``--results`` file, whatever sections have run."""
    rows = ["| what | measured | target |", "| --- | --- | --- |"]
    for key, r in sorted(results.get("unet", {}).items()):
        name, batch = key.split("/")
        best = f"eager {r['eager']:.1f} ms" if r["eager"] else ""
        if r["compiled"]:
            best = f"compiled {r['compiled']:.1f} ms, {best}"
        speed = f"; diffusers eager {r['diffusers']:.1f} ms" if r["diffusers"] else ""
        ratio = f" ({r['diffusers'] / r['compiled']:.2f}x diffusers)" if r["diffusers"] and r["compiled"] else ""
        target = "at least 2x faster than diffusers eager" if key == "float16/2" else ""
        rows.append(f"| UNet forward batch {batch}, {name} | {best}{ratio}{speed} | {target} |")
    for key, r in sorted(results.get("stylize", {}).items()):
        setting, mode = key.split("/")
        rows.append(f"| `stylize` steady state, {mode}, model.compile={setting} | {r['steady']:.3f} s "
                    "| at most 0.6 s |")
    for setting, wall in results.get("cli", {}).items():
        rows.append(f"| `train_free_run.py` one-shot, model.compile={setting} | {wall:.1f} s | at most 8 s |")
    peaks = [r["peak"] for r in results.get("stylize", {}).values()]
    if peaks:
        rows.append(f"| peak GPU memory (stylize) | {gib(max(peaks))} GiB | (4.1 GiB before) |")
    return rows


def main(args) -> None:
    """Run the sections asked for (all without --unet/--pipeline/--cli/--load), print their tables, add their figures to
    ``--results`` (JSON, kept between calls, written even when a time limit stops the run) and print the summary of
    everything measured so far."""
    name = torch.cuda.get_device_name(DEVICE) if on_cuda() else str(DEVICE)
    print(f"Device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}\n", flush=True)
    results = json.loads(args.results.read_text()) if args.results and args.results.is_file() else {}
    # `timeout`: keep what was measured (finally below); the caller's handler back after
    before = signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    every = not (args.unet or args.pipeline or args.cli or args.load)
    settings = ["false"] if args.no_compile else ["false", "true"]
    try:
        with tempfile.TemporaryDirectory() as folder:
            weights = args.weights
            if weights is None and (every or args.pipeline or args.cli or args.load):
                from random_checkpoint import write_random_checkpoint

                weights = write_random_checkpoint(Path(folder) / "sd15_random.safetensors")
            if every or args.unet:
                dtypes = ["float16"] + [d for d in args.dtypes if d not in ("float16", "float32")]
                rows = unet_section(dtypes, args.batches or [2, 4], latent=args.latent, rounds=4, runs=5,
                                    compile=not args.no_compile, summary=results.setdefault("unet", {}))
                print(f"UNet forward, {args.latent}x{args.latent} latent, context 77 x 768, random weights\n\n"
                      + "\n".join(rows) + "\n", flush=True)
            if every or args.pipeline:
                rows = stylize_section(weights, size=args.size, steps=args.steps, calls=3, compile_settings=settings,
                                       summary=results.setdefault("stylize", {}))
                print(f"stylize, {args.size} px, {args.steps} + {args.steps} steps, float16\n\n" + "\n".join(rows)
                      + "\n", flush=True)
            if every or args.cli:
                rows = cli_section(weights, size=args.size, steps=args.steps, compile_settings=settings,
                                   summary=results.setdefault("cli", {}))
                print(f"One-shot CLI, {args.size} px, {args.steps} + {args.steps} steps\n\n" + "\n".join(rows) + "\n",
                      flush=True)
            if every or args.load:
                print("Loading the checkpoint to the GPU (float16)\n\n" + "\n".join(load_section(weights)) + "\n",
                      flush=True)
    finally:
        signal.signal(signal.SIGTERM, before)
        if args.results:
            args.results.write_text(json.dumps(results, indent=1))
        print(f"Summary ({name})\n\n" + "\n".join(summary_table(results)) + "\n", flush=True)
