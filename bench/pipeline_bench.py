"""The pipeline and feature-store sections of ``bench/benchmark.py``.

Both run the real pipeline (``magicstyle.pipeline``) on a full-size SD1.5 checkpoint: a real one with ``--weights``,
or one with random weights written by ``bench/random_checkpoint.py`` (speed and memory do not depend on the values).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from magicstyle import csdi, load_config, load_model, stylize

ROOT = Path(__file__).resolve().parents[1]
CONTENT, STYLE = ROOT / "examples" / "astronaut.png", ROOT / "examples" / "hubble_deep_field.jpg"


def timed_unet(sd) -> dict:
    """Make ``sd.unet`` add the seconds of every forward to the returned dict (CPU work is synchronous)."""
    record = {"seconds": 0.0, "calls": 0}
    forward = sd.unet.forward

    def run(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        record["seconds"] += time.perf_counter() - start
        record["calls"] += 1
        return out

    sd.unet.forward = run
    return record


def run_pipeline(sd, cfg) -> dict:
    """One stylization through ``magicstyle.stylize``: seconds per phase, UNet seconds and rows, store bytes."""
    unet, stats = timed_unet(sd), {}
    try:
        stylize(CONTENT, STYLE, cfg, sd=sd, stats=stats)
    finally:
        del sd.unet.forward  # back to the class's forward
    total = sum(s for phase, s in stats["seconds"].items() if phase != "compile")  # compiling is within the phases
    return {
        "seconds": stats["seconds"], "total": total, "unet_seconds": unet["seconds"], "unet_calls": unet["calls"],
        "unet_share": unet["seconds"] / total, "store_bytes": stats["feature_store_bytes"], "unet_rows": stats["unet_rows"],
    }


def pipeline_section(weights: Path, *, size: int, steps: int, dtype: str, modes=("memory", "recompute")) -> list[str]:
    rows = ["| store.mode | encode s | invert s | generate s | decode s | total s | UNet s | UNet share | UNet rows | store |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cfg = load_config(None, {"size": size, "steps": steps, "model": {"weights": str(weights), "dtype": dtype}})
    sd = load_model(cfg)
    for mode in modes:
        r = run_pipeline(sd, load_config(None, {**_plain(cfg), "store": {"mode": mode}}))
        s = r["seconds"]
        rows.append(
            f"| {mode} | {s['encode']:.1f} | {s['invert']:.1f} | {s['generate']:.1f} | {s['decode']:.1f} "
            f"| {r['total']:.1f} | {r['unet_seconds']:.1f} | {100 * r['unet_share']:.1f}% | {r['unet_rows']} "
            f"| {_mib(r['store_bytes'])} |"
        )
    return rows


def store_section(weights: Path, *, sizes=(256, 512, 768), steps: int = 30, dtype: str) -> list[str]:
    """Feature-store bytes per mode and size for ``steps`` steps, measured on a 1-step inversion times ``steps``
    (the store holds the same amount per step)."""
    rows = ["| size | store.mode | ffa.layers | bytes for 30 steps |", "| --- | --- | --- | --- |"]
    cfg = load_config(None, {"steps": 1, "model": {"weights": str(weights), "dtype": dtype}})
    sd = load_model(cfg)
    for size in sizes:
        z0 = torch.randn(2, 4, size // 8, size // 8)
        for mode, layers in (("memory", None), ("memory", "all"), ("recompute", None)):
            over = {**_plain(cfg), "size": size, "store": {"mode": mode}}
            if layers:
                over["ffa"] = {"layers": layers}
            inversion = csdi(sd, z0, load_config(None, over))
            rows.append(f"| {size} | {mode} | {layers or 'decoder 6-11'} | {_mib(inversion.store.nbytes * steps)} |")
    return rows


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
