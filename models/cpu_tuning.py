"""Which CPU fast paths this machine should use: prepacked weights or not, which attention kernel, and whether a
bfloat16 model computes in bfloat16 or in float32.

What is fastest depends on the CPU family, not only on its flags (``bench/README.md``, one table per family): the
prepacked oneDNN convolutions of ``models/layers.py`` pay off on Xeons with AMX and lose on an AMD EPYC with
AVX512-BF16, and without AMX oneDNN's bfloat16 kernels can be 1.5-2x slower than its float32 ones.  ``tune(dtype)``
therefore times a few representative convolutions and linear maps of the SD1.5 UNet and VAE with and without the
prepacked weight, and the attention kernels of ``attention/core.py`` at the UNet's largest self-attention (4096
tokens), once per CPU model, torch version and dtype, and keeps the answer in the user's cache folder
(``$XDG_CACHE_HOME/magicstyle`` or ``~/.cache/magicstyle``, file ``cpu_tuning.json``).  For bfloat16 it compares the
fastest bfloat16 paths with the fastest float32 ones (``model.cpu_compute: auto``).  Where the micro-benchmark cannot
run, a capability rule decides: prepack where the CPU has AMX, PyTorch's SDPA, the model's own dtype.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from attention.core import ATTENTION_KERNELS

from .layers import Conv2d, Linear
from .usercache import cache_folder, read_json, write_json

CACHE_NAME = "cpu_tuning.json"
# (in channels, out channels, side, kernel, batch) of the convolutions timed: the UNet's four levels at 512 px (the
# 2560 -> 1280 one is an output block's first convolution on the concatenated skip) and a 512-channel VAE convolution.
# Batch 1 and a 32x32 VAE input keep the one-time cost to a few seconds.
CONV_SHAPES = ((320, 320, 64, 3, 1), (640, 640, 32, 3, 1), (1280, 1280, 16, 3, 1), (2560, 1280, 8, 3, 1),
               (512, 512, 32, 3, 1))
# (tokens, in features, out features) of the linear maps timed: a GEGLU projection and the feed-forward output at the
# 64x64 level, and a GEGLU projection at the 32x32 level, batch 1.
LINEAR_SHAPES = ((4096, 320, 2560), (4096, 1280, 320), (1024, 640, 5120))
ATTENTION_SHAPE = (1, 2, 4096, 40)  # (B, heads, tokens, d): self-attention at the UNet's 64x64 level (512 px), 2 heads
PREPACK_MARGIN = 0.03  # prepack only if it saves 3% of the convolution time: it costs a second copy of the weights
ATTENTION_MARGIN = 0.05  # leave PyTorch's SDPA only for a kernel at least 5% faster
COMPUTE_MARGIN = 0.05  # a bfloat16 model computes in float32 only if that saves 5%: its activations take twice the memory
TUNING_FORMAT = 2  # part of the cache key: entries of an earlier format (no linear maps, no compute) are measured again
REPEATS = 2  # best of 2, the paths alternating, after one warm-up call each


@dataclass(frozen=True)
class CPUInfo:
    model: str  # e.g. "Intel(R) Xeon(R) Processor (family 6, model 207)"
    amx: bool  # AMX tiles usable (bfloat16 matrix units)
    avx512_bf16: bool

    def line(self) -> str:
        yes = {True: "yes", False: "no"}
        return f"{self.model}, AMX {yes[self.amx]}, AVX512-BF16 {yes[self.avx512_bf16]}"


@dataclass(frozen=True)
class CPUChoice:
    prepack: bool  # Conv2d and Linear on prepacked oneDNN weights
    attention: str  # a name in attention.core.ATTENTION_KERNELS
    source: str  # "measured", "cached", "capability" or "config"
    compute: torch.dtype | None = None  # the dtype a model computes in (None: its weights' dtype)


def _flag(name: str) -> bool:
    try:
        return bool(getattr(torch.cpu, name)())
    except (AttributeError, RuntimeError):
        return False


def cpu_info() -> CPUInfo:
    """The CPU model (``/proc/cpuinfo``'s model name with family and model numbers) and the flags that matter here."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return CPUInfo(name, _flag("_is_amx_tile_supported"), _flag("_is_avx512_bf16_supported"))


def capability_choice(info: CPUInfo) -> CPUChoice:
    """The rule used where nothing was measured: prepacked weights pay off with AMX (bench/README.md)."""
    return CPUChoice(prepack=info.amx, attention="sdpa", source="capability")


def choose(timings: dict) -> CPUChoice:
    """The decision from measured seconds: ``{"conv": {"prepacked": s, "plain": s}, "linear": {...},
    "attention": {kernel: s}}`` (``linear`` may be missing)."""
    layers = [timings["conv"], timings.get("linear", {"prepacked": 0.0, "plain": 0.0})]
    prepack = sum(t["prepacked"] for t in layers) < (1 - PREPACK_MARGIN) * sum(t["plain"] for t in layers)
    attention = timings["attention"]
    fastest = min(attention, key=attention.get)
    if fastest != "sdpa" and attention[fastest] >= (1 - ATTENTION_MARGIN) * attention["sdpa"]:
        fastest = "sdpa"
    return CPUChoice(prepack=prepack, attention=fastest, source="measured")


def chosen_seconds(timings: dict) -> float:
    """Seconds of the timed layers on the paths ``choose`` picks: what the two compute dtypes are compared by."""
    choice = choose(timings)
    path = "prepacked" if choice.prepack else "plain"
    return sum(timings[k][path] for k in ("conv", "linear") if k in timings) + timings["attention"][choice.attention]


def compute_dtype(bf16: dict, f32: dict) -> torch.dtype:
    """float32 arithmetic for a bfloat16 model where its timed layers are ``COMPUTE_MARGIN`` faster in float32."""
    faster = chosen_seconds(f32) < (1 - COMPUTE_MARGIN) * chosen_seconds(bf16)
    return torch.float32 if faster else torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# The micro-benchmark


def best_times(runs: dict[str, Callable[[], object]], timer: Callable[[], float] = time.perf_counter,
               repeats: int = REPEATS) -> dict[str, float]:
    """The best time of each callable over ``repeats`` rounds, alternating them, after one warm-up call each."""
    for run in runs.values():
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = timer()
            run()
            best[name] = min(best[name], timer() - start)
    return best


def measure_convs(dtype: torch.dtype, shapes=CONV_SHAPES, timer=time.perf_counter, repeats=REPEATS) -> dict:
    """Total seconds of ``shapes`` (channels-last input, as in the models) with and without prepacked weights."""
    total = {"prepacked": 0.0, "plain": 0.0}
    g = torch.Generator().manual_seed(0)
    for cin, cout, side, kernel, batch in shapes:
        packed = Conv2d(cin, cout, kernel, padding=kernel // 2, dtype=dtype).requires_grad_(False)
        plain = Conv2d(cin, cout, kernel, padding=kernel // 2, dtype=dtype).requires_grad_(False)
        plain.load_state_dict(packed.state_dict())
        plain.prepack = False
        x = torch.randn(batch, cin, side, side, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            best = best_times({"prepacked": lambda: packed(x), "plain": lambda: plain(x)}, timer, repeats)
        for name in total:
            total[name] += best[name]
    return total


def measure_attention(dtype: torch.dtype, shape=ATTENTION_SHAPE, timer=time.perf_counter, repeats=REPEATS) -> dict:
    """Seconds of each kernel in ``ATTENTION_KERNELS`` on q, k, v laid out as ``multihead_attention`` passes them."""
    B, heads, n, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, heads * d, generator=g).to(dtype).unflatten(-1, (heads, d)).transpose(1, 2)
               for _ in range(3))
    with torch.inference_mode():
        return best_times({name: (lambda f=f: f(q, k, v)) for name, f in ATTENTION_KERNELS.items()}, timer, repeats)


def measure_linears(dtype: torch.dtype, shapes=LINEAR_SHAPES, timer=time.perf_counter, repeats=REPEATS) -> dict:
    """Total seconds of the linear maps ``shapes`` with and without prepacked weights."""
    total = {"prepacked": 0.0, "plain": 0.0}
    g = torch.Generator().manual_seed(0)
    for tokens, cin, cout in shapes:
        packed = Linear(cin, cout, dtype=dtype).requires_grad_(False)
        plain = Linear(cin, cout, dtype=dtype).requires_grad_(False)
        plain.load_state_dict(packed.state_dict())
        plain.prepack = False
        x = torch.randn(1, tokens, cin, generator=g).to(dtype)
        with torch.inference_mode():
            best = best_times({"prepacked": lambda: packed(x), "plain": lambda: plain(x)}, timer, repeats)
        for name in total:
            total[name] += best[name]
    return total


def measure(dtype: torch.dtype) -> dict:
    return {"conv": measure_convs(dtype), "linear": measure_linears(dtype), "attention": measure_attention(dtype)}


# ---------------------------------------------------------------------------------------------------------------------
# The cache


def cache_file() -> Path:
    return cache_folder() / CACHE_NAME


def cache_key(info: CPUInfo, dtype: torch.dtype) -> str:
    return f"{info.model} | torch {torch.__version__} | {_name(dtype)} | tuning {TUNING_FORMAT}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_cache(path: Path, entries: dict) -> None:
    write_json(path, entries, indent=1, sort_keys=True)


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("prepack"), bool)
            and entry.get("attention") in ATTENTION_KERNELS and entry.get("compute") in ("float32", "bfloat16"))


def tune(dtype: torch.dtype, *, info: CPUInfo | None = None, path: Path | None = None,
         measure: Callable[[torch.dtype], dict] = measure) -> CPUChoice:
    """The fast paths for this CPU and ``dtype``: from the cache, else measured once and cached, else by capability.
    For bfloat16 the float32 paths are measured too (and cached as float32's), to choose the compute dtype."""
    info = info or cpu_info()
    entry, source = _entry(dtype, info, path or cache_file(), measure)
    if entry is None:
        return capability_choice(info)
    return CPUChoice(entry["prepack"], entry["attention"], source, getattr(torch, entry["compute"]))


def _entry(dtype: torch.dtype, info: CPUInfo, path: Path, measure: Callable[[torch.dtype], dict]):
    """(this CPU's cache entry for ``dtype``, "cached" or "measured"); (None, "") where nothing could be measured.
    A measured entry is used even where the cache cannot be written."""
    entry = read_json(path).get(cache_key(info, dtype))
    if _valid(entry):
        return entry, "cached"
    if dtype not in (torch.float32, torch.bfloat16):  # no oneDNN path to choose (float16 runs plain convolutions)
        return None, ""
    try:
        timings = measure(dtype)
        choice = choose(timings)
        compute = dtype
        if dtype == torch.bfloat16:
            f32, _ = _entry(torch.float32, info, path, measure)
            if f32 is not None and isinstance(f32.get("seconds"), dict):
                compute = compute_dtype(timings, f32["seconds"])
    except Exception:  # no oneDNN, no bfloat16 kernels, out of memory: the capability rule decides, nothing cached
        return None, ""
    entry = {"prepack": choice.prepack, "attention": choice.attention, "compute": _name(compute), "seconds": timings,
             "cpu": info.line()}
    write_cache(path, {**read_json(path), cache_key(info, dtype): entry})
    return entry, "measured"


def fast_paths(prepack: bool | str, attention: str, dtype: torch.dtype, device: torch.device | str = "cpu", *,
               compute: str = "native", tuner: Callable[[torch.dtype], CPUChoice] = tune) -> CPUChoice:
    """The config's ``model.prepack`` (auto, true or false), ``model.attention`` (auto or a kernel name) and
    ``model.cpu_compute`` (``compute``: auto, native or float32) for a model stored in ``dtype`` on ``device``.
    ``auto`` asks ``tuner`` on a CPU; elsewhere none of them changes anything.  With float32 compute, the prepack and
    attention choices are float32's: those are the kernels that run."""
    if torch.device(device).type != "cpu":
        return CPUChoice(prepack=prepack is not False, attention="sdpa" if attention == "auto" else attention,
                         source="config")
    runs_in = dtype
    if dtype == torch.bfloat16 and compute == "float32":
        runs_in = torch.float32
    elif dtype == torch.bfloat16 and compute == "auto":
        runs_in = tuner(dtype).compute or dtype
    if "auto" not in (prepack, attention):
        return CPUChoice(prepack=prepack is not False, attention=attention, source="config",
                         compute=None if runs_in == dtype else runs_in)
    tuned = tuner(runs_in)
    return CPUChoice(prepack=tuned.prepack if prepack == "auto" else prepack,
                     attention=tuned.attention if attention == "auto" else attention, source=tuned.source,
                     compute=None if runs_in == dtype else runs_in)
