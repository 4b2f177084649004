"""The ``--batch`` section of ``bench/benchmark.py``: a C x S grid run through the command line's runner.

The grid is what ``train_free_run.py --content DIR --style DIR`` does (``magicstyle/batch.py``: each image inverted
once, ``batch.pairs`` pairs per FFF UNet batch), on synthetic images (speed does not depend on them) and a full-size
checkpoint (random weights unless ``--weights``).  A "warm" row runs the same grid again with the inversion cache
filled by the cold run (``batch.cache``; memory mode caches the features too), i.e. a later sweep over the same images.

UNet rows are exact, whatever the machine: a run of one pair costs 4 x steps rows (2 images inverted at guidance 1,
2 guidance rows generated); a C x S grid in memory mode costs steps x (C + S) rows of inversion (none when cached)
plus 2 x steps x C x S rows of generation.  So per pair: 2 x steps + steps x (C + S) / (C x S), which tends to half a
single run as the grid grows (2 x 2: 0.75x; 10 x 10: 0.55x; a warm cache: 0.50x at any size).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magicstyle.inversion import CountedUNet


@contextmanager
def timed_unet():
    """Add the seconds and rows of every UNet call the samplers make in this process to the yielded dict (GPU work
    synchronised).  It wraps ``CountedUNet``, outside the UNet, so that a compiled UNet (``model.compile``) is timed
    as it runs."""
    record = {"seconds": 0.0, "calls": 0, "rows": 0}
    call = CountedUNet.__call__

    def run(self, x, *args, **kwargs):
        start = time.perf_counter()
        out = call(self, x, *args, **kwargs)
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        record["seconds"] += time.perf_counter() - start
        record["calls"] += 1
        record["rows"] += x.shape[0]
        return out

    CountedUNet.__call__ = run
    try:
        yield record
    finally:
        CountedUNet.__call__ = call


def synthetic_images(folder: Path, n: int, size: int, seed: int) -> Path:
    """``n`` distinct smooth random RGB images (size x size PNGs) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        small = torch.rand(1, 3, 8, 8, generator=g)
        image = torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic", align_corners=False)
        pixels = (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(folder / f"{i:03d}.png")
    return folder


def expected_rows(contents: int, styles: int, steps: int, *, cached: bool) -> int:
    """UNet rows of a C x S grid in memory mode at the default guidance (inversion 1 row, generation 2 rows)."""
    return (0 if cached else steps * (contents + styles)) + 2 * steps * contents * styles


def run_grid(weights: Path, folder: Path, contents: int, styles: int, *, size: int, steps: int, dtype: str,
             mode: str, pairs: str, cache: Path | None, name: str, compile: str = "auto") -> dict:
    """One run of the command line over the grid; its report plus the UNet's share, timed in this process."""
    import common
    import train_free_run

    report = folder / f"{name}.json"
    argv = ["--content", str(folder / "contents"), "--style", str(folder / "styles"), "--output", str(folder / name),
            "--weights", str(weights), "--size", str(size), "--steps", str(steps), "--dtype", dtype,
            "--report", str(report), "--overwrite", "--quiet", f"store.mode={mode}", f"batch.pairs={pairs}",
            f"model.compile={compile}"]
    if cache is not None:
        argv += [f"batch.cache={cache}", "batch.cache_features=true"]
    if common.HPARAMS:
        argv.append(f"model.hparams={common.HPARAMS}")
    common.reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with timed_unet() as unet:
        status = train_free_run.main(argv)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"the grid run {name} failed with exit status {status}")
    r = json.loads(report.read_text())
    seconds = wall - r["seconds"]["load"]  # the run without loading the model
    return {"report": r, "seconds": seconds, "unet_seconds": unet["seconds"], "unet_rows": unet["rows"],
            "peak_rss_gib": common.peak_rss_gib(),
            "peak_cuda": f"{r['peak_cuda_bytes'] / 2**30:.2f}" if "peak_cuda_bytes" in r else "-"}


def batch_section(weights: Path, *, grid: tuple[int, int], size: int, steps: int, dtype: str, mode: str = "memory",
                  pairs: str = "auto", warm: bool = True, compile: str = "auto") -> list[str]:
    contents, styles = grid
    single = 4 * steps
    rows = ["| run | pairs | batch.pairs | seconds | pairs/s | UNet rows | rows/pair | x single run | UNet rows/s "
            "| peak RSS GiB | peak CUDA GiB | outside UNet | compiling s (part of seconds) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthetic_images(folder / "contents", contents, size, seed=1)
        synthetic_images(folder / "styles", styles, size, seed=2)
        cache = folder / "cache" if warm else None
        for name in ("cold", "warm") if warm else ("cold",):  # cold: inverts, and fills the cache when warm follows
            print(f"{contents}x{styles} grid, {name} ...", file=sys.stderr, flush=True)
            r = run_grid(weights, folder, contents, styles, size=size, steps=steps, dtype=dtype, mode=mode,
                         pairs=pairs, cache=cache, name=name, compile=compile)
            n = contents * styles
            assert r["report"]["jobs_done"] == n, f"{r['report']['jobs_done']} of {n} jobs done"
            assert r["report"]["unet_rows"] == r["unet_rows"], "the report's UNet rows and the timed ones differ"
            if mode == "memory":
                assert r["unet_rows"] == expected_rows(contents, styles, steps, cached=name == "warm")
            rows.append(
                f"| {name} | {n} | {pairs} | {r['seconds']:.1f} | {n / r['seconds']:.3f} | {r['unet_rows']} "
                f"| {r['unet_rows'] / n:.1f} | {r['unet_rows'] / n / single:.2f} | {r['unet_rows'] / r['seconds']:.2f} "
                f"| {r['peak_rss_gib']:.2f} | {r['peak_cuda']} "
                f"| {100 * (1 - r['unet_seconds'] / r['seconds']):.1f}% "
                f"| {r['report']['seconds'].get('compile', 0.0):.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows
