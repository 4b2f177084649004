"""``benchmark.py --unet --against diffusers|prepack``: our UNet against another forward, alternated in one process.

The machines this runs on are shared and the same forward varies by up to 2x from one minute to the next, so the
forwards run in alternating rounds (best of ``best_of`` each per round) and the ratio is taken round by round.

``diffusers``: diffusers' ``UNet2DConditionModel`` (SD1.5 configuration, its default SDPA attention) on the very
weight tensors of our UNet.  diffusers is a benchmark-only package, not a dependency of the project
(``pip install diffusers``).  ``prepack``: our UNet with prepacked convolutions on and off, to check what
``model.prepack: auto`` chose (``models/cpu_tuning.py``).  Our UNet computes in the dtype ``model.cpu_compute``
chose (``--cpu-compute``); the row says so where that is not its weights' dtype.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch

from models.config import SD15Config
from models.layers import set_prepack
from models.cpu_tuning import CPUChoice
from models.loader import UNET_PREFIX
from models.unet import UNet


def diffusers_unet(unet: UNet):
    """diffusers' ``UNet2DConditionModel`` for SD1.5 sharing ``unet``'s weight tensors (its checkpoint conversion)."""
    try:
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    except ImportError:
        sys.exit("error: --against diffusers needs the diffusers package, a benchmark-only extra: pip install diffusers")
    with torch.device("meta"):
        model = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    state = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in unet.state_dict().items()}, model.config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def twin(unet: UNet) -> UNet:
    """A second UNet on the same weight tensors (its own prepack switch and packed copies)."""
    with torch.device("meta"):
        other = UNet(SD15Config())
    other.load_state_dict(unet.state_dict(), strict=True, assign=True)
    other.compute_dtype = unet.compute_dtype
    return other.eval().requires_grad_(False)


def alternate(runs: dict[str, Callable[[], object]], rounds: int, best_of: int) -> dict[str, list[float]]:
    """Per round, the best of ``best_of`` calls of each callable in turn; one warm-up call each first."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(rounds):
        for name, run in runs.items():
            best = float("inf")
            for _ in range(best_of):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
            seconds[name].append(best)
        print(f"round {i + 1}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()), file=sys.stderr,
              flush=True)
    return seconds


def ratio_cell(a: list[float], b: list[float]) -> str:
    ratios = [x / y for x, y in zip(a, b)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}, median {statistics.median(ratios):.2f}"


def time_cell(s: list[float]) -> str:
    return f"{statistics.median(s):.2f} / {min(s):.2f}"


def against_section(unet: UNet, dtype: torch.dtype, choice: CPUChoice, *, against: str, batch: int, latent: int,
                    rounds: int, best_of: int) -> list[str]:
    """One table row comparing ``unet`` (prepack as ``choice`` says) with diffusers, or prepack on with off."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g, dtype=dtype)
    t = torch.linspace(999, 1, batch).long()
    context = torch.randn(batch, 77, 768, generator=g, dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    if choice.compute not in (None, dtype):  # model.cpu_compute: bfloat16 weights, float32 arithmetic
        name += f" (computes in {str(choice.compute).removeprefix('torch.')})"
    if against == "diffusers":
        other = diffusers_unet(unet)
        set_prepack(unet, choice.prepack)
        with torch.inference_mode():
            ours_out, theirs_out = unet(x, t, context).float(), other(x, t, context).sample.float()
        err = ((ours_out - theirs_out).norm() / theirs_out.norm()).item()
        with torch.inference_mode():
            s = alternate({"ours": lambda: unet(x, t, context), "diffusers": lambda: other(x, t, context)},
                          rounds, best_of)
        return [f"| {name} | {batch} | {time_cell(s['ours'])} | {time_cell(s['diffusers'])} "
                f"| {ratio_cell(s['ours'], s['diffusers'])} | {rounds} | {err:.1e} |"]
    off = twin(unet)
    set_prepack(unet, True)
    set_prepack(off, False)
    with torch.inference_mode():
        s = alternate({"prepack on": lambda: unet(x, t, context), "prepack off": lambda: off(x, t, context)},
                      rounds, best_of)
    on_off = [a / b for a, b in zip(s["prepack on"], s["prepack off"])]
    default = s["prepack on" if choice.prepack else "prepack off"]
    best = [min(a, b) for a, b in zip(s["prepack on"], s["prepack off"])]
    set_prepack(unet, choice.prepack)
    return [f"| {name} | {batch} | {time_cell(s['prepack on'])} | {time_cell(s['prepack off'])} "
            f"| {min(on_off):.2f}-{max(on_off):.2f}, median {statistics.median(on_off):.2f} "
            f"| {'on' if choice.prepack else 'off'} ({choice.source}) "
            f"| {statistics.median(default) / statistics.median(best):.3f} | {rounds} |"]


def header(against: str) -> list[str]:
    if against == "diffusers":
        return ["| dtype | batch | ours s (median / min) | diffusers s (median / min) | ours / diffusers, per round "
                "| rounds | relative difference |", "| --- | --- | --- | --- | --- | --- | --- |"]
    return ["| dtype | batch | prepack on s (median / min) | prepack off s (median / min) | on / off, per round "
            "| auto chose | auto / best of on, off (medians) | rounds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
