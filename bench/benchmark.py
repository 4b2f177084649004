"""Speed and memory of the pieces of MagicStyle, printed as Markdown tables.

    python bench/benchmark.py --unet                      # UNet forward per dtype and batch (random weights)
    python bench/benchmark.py --unet --weights weights/realisticVisionV60B1_v51VAE.safetensors
    python bench/benchmark.py --unet --against diffusers  # ours and diffusers' UNet alternated (bench/against.py)
    python bench/benchmark.py --unet --against prepack    # prepacked convolutions on against off
    python bench/benchmark.py --pipeline --store          # the full pipeline and the feature store
    python bench/benchmark.py --device cuda --steps 30    # on a GPU: issue 11's table (bench/gpu_bench.py)
    python bench/benchmark.py --batch --grid 2x2          # a content x style grid through the runner (pairs/s, rows)

Each section is one function returning table rows.  Without ``--weights`` the UNet section builds the full-size SD1.5
UNet with random weights (speed does not depend on the values), and the pipeline sections write a random checkpoint
in the real layout (``bench/random_checkpoint.py``) to a temporary folder.  Timings are wall-clock seconds on the
current machine with PyTorch's default thread count; the first call of a configuration is reported apart because it
includes one-time work (oneDNN reordering the convolution weights, see ``models/unet.py``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from magicstyle.config import DTYPES  # noqa: E402
from attention.core import set_cpu_attention  # noqa: E402
from models.config import SD15Config  # noqa: E402
from models.layers import set_prepack  # noqa: E402
from models.cpu_tuning import cpu_info, fast_paths  # noqa: E402
from models.loader import UNET_PREFIX, SafetensorsFile, component_keys, load_component  # noqa: E402
from models.unet import UNet  # noqa: E402

from common import peak_rss_gib, random_unet, reset_peak_rss  # noqa: E402  (bench/common.py)



# ---------------------------------------------------------------------------------------------------------------------
# UNet


def checkpoint_unet(path: Path, dtype: torch.dtype) -> UNet:
    """Only the UNet of a single-file SD1.5 checkpoint, loaded the way ``load_sd15`` loads it."""
    file = SafetensorsFile(path)
    keys = component_keys(file.shapes, UNET_PREFIX)
    return load_component(lambda: UNet(SD15Config()), file, keys, "UNet", prefix=UNET_PREFIX, device="cpu", dtype=dtype)


def time_unet(unet: UNet, batch: int, latent: int, dtype: torch.dtype, *, warmup: int, runs: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g, dtype=dtype)
    t = torch.linspace(999, 1, batch).long()
    context = torch.randn(batch, 77, 768, generator=g, dtype=dtype)
    reset_peak_rss()
    seconds = []
    with torch.inference_mode():
        for _ in range(warmup + runs):
            start = time.perf_counter()
            unet(x, t, context)
            seconds.append(time.perf_counter() - start)
    timed = seconds[warmup:] or seconds
    return {"first": seconds[0], "median": statistics.median(timed), "min": min(timed), "peak_rss": peak_rss_gib()}


def tuned(unet: UNet, dtype: torch.dtype, compute: str = "auto"):
    """Apply what ``model.prepack``, ``model.attention`` and ``model.cpu_compute`` (``compute``) pick on this CPU with
    ``auto`` (``models/cpu_tuning.py``)."""
    choice = fast_paths("auto", "auto", dtype, "cpu", compute=compute)
    set_prepack(unet, choice.prepack)
    set_cpu_attention(choice.attention)
    unet.compute_dtype = choice.compute
    runs_in = str(choice.compute or dtype).removeprefix("torch.")
    print(f"{dtype}: prepack {'on' if choice.prepack else 'off'}, attention {choice.attention}, computes in {runs_in} "
          f"({choice.source})", file=sys.stderr, flush=True)
    return choice


def against_section(weights: Path | None, against: str, *, dtypes, batches, latent: int, rounds: int,
                    best_of: int, compute: str = "auto") -> list[str]:
    from against import against_section as row, header

    rows = [f"UNet forward against {against}, {latent}x{latent} latent, "
            f"{'weights ' + str(weights) if weights else 'random weights'}, {rounds} alternated rounds, "
            f"best of {best_of} per round", ""] + header(against)
    for name in dtypes:
        unet = checkpoint_unet(weights, DTYPES[name]) if weights else random_unet(DTYPES[name])
        choice = tuned(unet, DTYPES[name], compute)
        for batch in batches:
            rows += row(unet, DTYPES[name], choice, against=against, batch=batch, latent=latent, rounds=rounds,
                        best_of=best_of)
            print(rows[-1], file=sys.stderr, flush=True)
        del unet
    return rows


def unet_section(weights: Path | None, *, dtypes, batches, latent: int, warmup: int, runs: int,
                 compute: str = "auto") -> list[str]:
    rows = [
        f"UNet forward, {latent}x{latent} latent ({8 * latent}px), context (B, 77, 768), "
        f"{'weights ' + str(weights) if weights else 'random weights'}, {warmup} warm-up + {runs} timed runs",
        "",
        "| dtype | batch | first call s | forward s (median) | min s | s per image | peak RSS GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in dtypes:
        unet = checkpoint_unet(weights, DTYPES[name]) if weights else random_unet(DTYPES[name])
        tuned(unet, DTYPES[name], compute)
        for batch in batches:
            r = time_unet(unet, batch, latent, DTYPES[name], warmup=warmup, runs=runs)
            rows.append(
                f"| {name} | {batch} | {r['first']:.2f} | {r['median']:.2f} | {r['min']:.2f} "
                f"| {r['median'] / batch:.2f} | {r['peak_rss']:.2f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)  # progress: full-size forwards take seconds each
        del unet
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline and feature store (bench/pipeline_bench.py)


def checkpoint_for_pipeline(weights: Path | None, folder: str) -> Path:
    if weights:
        return weights
    from random_checkpoint import write_random_checkpoint

    print("writing a random full-size checkpoint ...", file=sys.stderr, flush=True)
    return write_random_checkpoint(Path(folder) / "sd15_random.safetensors")


def pipeline_section(weights: Path, *, size: int, steps: int, dtype: str) -> list[str]:
    from pipeline_bench import pipeline_section as section

    return [f"Pipeline, {size}px, {steps} steps, dtype {dtype}", ""] + section(weights, size=size, steps=steps, dtype=dtype)


def store_section(weights: Path, *, dtype: str) -> list[str]:
    """The store's bytes are in ``store.dtype`` (the configuration's, float16 by default), not the model's dtype."""
    from magicstyle.config import load_config
    from pipeline_bench import store_section as section

    store_dtype = load_config(None).store.dtype  # what pipeline_bench's runs use: the defaults' store
    return [f"Feature store, store.dtype {store_dtype} (model dtype {dtype})", ""] + section(weights, dtype=dtype)


def batch_section(weights: Path, *, grid: tuple[int, int], size: int, steps: int, dtype: str, mode: str,
                  pairs: str, warm: bool, compile: str = "auto") -> list[str]:
    from batch_bench import batch_section as section

    title = (f"Grid {grid[0]}x{grid[1]}, {size}px, {steps} steps, dtype {dtype}, store.mode={mode}, "
             f"batch.pairs={pairs}, model.compile={compile}; single run = {4 * steps} UNet rows")
    return [title, ""] + section(weights, grid=grid, size=size, steps=steps, dtype=dtype, mode=mode, pairs=pairs,
                                 warm=warm, compile=compile)


def grid_shape(text: str) -> tuple[int, int]:
    c, _, s = text.lower().partition("x")
    if not (c.isdigit() and s.isdigit() and int(c) * int(s) >= 2):
        raise argparse.ArgumentTypeError(f"--grid must be CxS with at least 2 pairs, e.g. 2x2, not {text!r}")
    return int(c), int(s)


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``: without the program's name; None: ``sys.argv``); a bad one exits with status 2.
    tests/test_bench.py parses every command line of ``bench/gpu_session.sh`` with it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", action="store_true", help="UNet forward time and peak memory")
    parser.add_argument("--pipeline", action="store_true", help="one stylization, phase by phase")
    parser.add_argument("--store", action="store_true", help="feature-store size per mode and image size")
    parser.add_argument("--batch", action="store_true", help="a C x S grid through the runner: pairs/s, UNet rows")
    parser.add_argument("--grid", type=grid_shape, default=(2, 2), help="--batch: contents x styles (default 2x2)")
    parser.add_argument("--pairs", default="auto", help="--batch: batch.pairs (auto or a number)")
    parser.add_argument("--mode", default="memory", choices=["memory", "recompute"], help="--batch: store.mode")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="--batch: model.compile (auto: on for a CUDA run of at least 100 jobs)")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        help="--batch: skip the second run from the inversion cache")
    parser.add_argument("--weights", type=Path, help="a real SD1.5 .safetensors checkpoint (default: random weights)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, help="UNet batch sizes (default 1 2 4; with --against: 2)")
    parser.add_argument("--against", choices=["diffusers", "prepack"],
                        help="--unet: alternate our UNet with diffusers' (a benchmark-only package), or prepack on/off")
    parser.add_argument("--cpu-compute", default="auto", choices=["auto", "native", "float32"],
                        help="--unet: model.cpu_compute for bfloat16 (default auto: what this CPU's tuning chose)")
    parser.add_argument("--rounds", type=int, default=6, help="--against: alternated rounds")
    parser.add_argument("--best-of", type=int, default=2, help="--against: forwards per model per round")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512px images)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="pipeline image size")
    parser.add_argument("--steps", type=int, default=10, help="pipeline DDIM steps")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="pipeline and store dtype")
    gpu = parser.add_argument_group("GPU (--device cuda, bench/gpu_bench.py)")
    gpu.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: every GPU section (or those named)")
    gpu.add_argument("--cli", action="store_true", help="cuda: the one-shot CLI's wall clock")
    gpu.add_argument("--load", action="store_true", help="cuda: loading through pinned memory against plain")
    gpu.add_argument("--no-compile", action="store_true", help="cuda: model.compile off only")
    gpu.add_argument("--results", type=Path, help="cuda: a JSON file the figures are added to (kept between calls)")
    args = parser.parse_args(argv)
    if not (args.device == "cuda" or args.unet or args.pipeline or args.store or args.batch):
        parser.error("choose at least one section: --unet, --pipeline, --store, --batch")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not args.batch:
        from gpu_bench import main as gpu_main

        return gpu_main(args)
    print(f"CPU: {cpu_info().line()}, {os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} "
          "threads\n")
    if args.unet and args.against:
        rows = against_section(args.weights, args.against, dtypes=args.dtypes, batches=args.batches or [2],
                               latent=args.latent, rounds=args.rounds, best_of=args.best_of,
                               compute=args.cpu_compute)
        print("\n".join(rows) + "\n", flush=True)
    elif args.unet:
        rows = unet_section(args.weights, dtypes=args.dtypes, batches=args.batches or [1, 2, 4], latent=args.latent,
                            warmup=args.warmup, runs=args.runs, compute=args.cpu_compute)
        print("\n".join(rows) + "\n", flush=True)
    if args.pipeline or args.store or args.batch:
        with tempfile.TemporaryDirectory() as folder:
            weights = checkpoint_for_pipeline(args.weights, folder)
            if args.pipeline:
                rows = pipeline_section(weights, size=args.size, steps=args.steps, dtype=args.dtype)
                print("\n".join(rows) + "\n", flush=True)
            if args.store:
                print("\n".join(store_section(weights, dtype=args.dtype)) + "\n", flush=True)
            if args.batch:
                rows = batch_section(weights, grid=args.grid, size=args.size, steps=args.steps, dtype=args.dtype,
                                     mode=args.mode, pairs=args.pairs, warm=args.warm, compile=args.compile)
                print("\n".join(rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
