"""The GPU fast path (``model.compile``): the UNet through ``torch.compile(mode="reduce-overhead")``.

On a GPU the eager UNet is bound by kernel launches (about 1000 per forward: batch 4 costs no more than batch 2).
``reduce-overhead`` fuses the element-wise work with Inductor and replays the whole forward as one CUDA graph per
input shape and recipe set, without giving up the recipe interface: the recipes are traced into the graph like the
rest of the UNet.  They stay graph-friendly because no timestep and no image index is a constant of the graph: the
pipeline moves the feature store to each step with ``store.step(t)``, and inside the graph the recipes read the store's
``on``, ``current`` (this step's features stacked per pair) and ``compact`` (recompute mode: index tensors into the
reference rows), and ``record`` leaves its tensors in ``pending``, which the next ``step`` copies out of the graph's
memory (attention/store.py).  So one graph serves all 30 steps, and CSDI, FFF and each batch shape get one each,
whichever images a batch pairs.  CUDA graphs read ``current`` and ``compact`` in place (TorchDynamo takes tensors
reached through the module's attributes as static inputs), so ``step`` refills the runner's ``store_buffers`` at fixed
addresses instead of making new tensors, which would make CUDA graph trees record the graph again every step.

``auto`` turns it on for a CUDA run of at least ``AUTO_MIN_JOBS`` jobs and off elsewhere.  On an H100 compiling and
warming up one graph took 74 s and saved 24.5 ms per batch-2 forward (32.1 -> 7.6 ms; ``bench/README.md``): with a
graph for CSDI and one for FFF, about 60 forwards per pair, it pays back after about 100 pairs, so a one-shot run (the
8 s target of issue 11) or the demo's first request stays eager.  On a CPU, compiling costs minutes and the oneDNN path
of ``models/layers.py`` is already the fast one.  ``true`` on a CPU compiles with Inductor's C++ backend (for tests and
experiments; the prepacked convolutions are turned off, their weight cache cannot be traced).  The first calls of each
new shape compile (about a minute for the full UNet on an H100); that time is also reported as ``seconds.compile``.
Attention diagnostics (``fff(..., diagnostics=...)``) run the eager UNet: the observer is Python that reads tensors.
"""
from __future__ import annotations

import os
import sys

import torch

from models import UNet
from models.layers import set_prepack

from .config import ConfigError, compile_supported

MODE = "reduce-overhead"  # CUDA graphs + Inductor; "max-autotune" also searches kernels (longer warm-up)
AUTO_MIN_JOBS = 100  # pairs after which compiling pays back on an H100 (above); not re-measured with batch.pairs > 1
RECOMPILE_LIMIT = 64  # graphs per UNet: one per (batch, size, dtype, recipe set, recipe on/off); dynamo's default is 8


def use_compile(setting, device: torch.device, jobs: int = 1) -> bool:
    """``model.compile``: ``auto`` (on for a CUDA run of at least ``AUTO_MIN_JOBS`` jobs, off elsewhere; off
    everywhere in a process tree started with the environment variable ``MAGICSTYLE_COMPILE_AUTO=0``, as the test
    suite does, and with a torch older than ``config.COMPILE_MIN_TORCH``, where ``config.validate`` refuses ``true``),
    true or false."""
    if setting == "auto":
        return (device.type == "cuda" and jobs >= AUTO_MIN_JOBS and compile_supported()
                and os.environ.get("MAGICSTYLE_COMPILE_AUTO", "1") != "0")
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"model.compile must be auto, true or false, not {setting!r}")


class CompiledUNet:
    """``unet(x, t, context)`` through ``torch.compile``; returns a tensor of its own (not a CUDA graph's output buffer,
    which the next replay overwrites)."""

    def __init__(self, unet: UNet, *, backend: str = "inductor", mode: str | None = MODE, fullgraph: bool = False):
        import torch._dynamo

        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        name = "recompile_limit" if limit is not None else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
        options = {"mode": mode} if backend == "inductor" else {}
        self.unet = unet
        self.store_buffers: dict = {}  # what the store hands the recipes, at fixed addresses (attention/store.py)
        self.fn = torch.compile(unet, backend=backend, dynamic=False, fullgraph=fullgraph, **options)
        self.graphs = backend == "inductor" and mode in ("reduce-overhead", "max-autotune")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are no longer read
        out = self.fn(x, t, context)
        return out.clone() if self.graphs else out


def compile_unet(unet: UNet, **options) -> CompiledUNet:
    """Attach a compiled runner to ``unet`` (the module itself is unchanged; ``runner(unet)`` returns it)."""
    if next(unet.parameters()).device.type == "cpu":
        set_prepack(unet, False)  # the oneDNN weight cache (models/layers.py) cannot be traced
    compiled = CompiledUNet(unet, **options)
    unet.__dict__["compiled"] = compiled  # a plain attribute, not a submodule: state_dict and .to() never see it
    return compiled


def runner(unet: UNet, *, eager: bool = False):
    """What calls ``unet(x, t, context)``: its compiled runner if it has one and ``eager`` is false, else itself."""
    return unet if eager else unet.__dict__.get("compiled", unet)


def compile_report() -> dict:
    """``{"compile": seconds}`` when this process compiled the UNet (already counted in the phases it happened in:
    ``--report``'s ``seconds.compile``), else ``{}``."""
    seconds = compile_seconds()
    return {"compile": seconds} if seconds else {}


def compile_seconds() -> float:
    """Seconds spent compiling in this process so far (TorchDynamo's own tally; 0 when nothing was compiled).  Does
    not import TorchDynamo (seconds of start-up) when nothing has."""
    utils = sys.modules.get("torch._dynamo.utils")
    metrics = getattr(utils, "compilation_time_metrics", {})
    return float(sum(metrics.get("_compile.compile_inner", [])))
