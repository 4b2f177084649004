"""What the benchmark sections share (bench/benchmark.py and the sections it hands over to): peak memory and the
full-size UNet with random weights."""
from __future__ import annotations

import platform
import resource
from pathlib import Path

import torch

from models.config import SD15Config
from models.unet import UNet

HPARAMS: Path | None = None  # model.hparams of the checkpoints the sections load: None for SD1.5 (tests: the tiny)


def peak_rss_gib() -> float:
    """Peak resident memory of this process since the last ``reset_peak_rss()`` (Linux), or since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def reset_peak_rss() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def random_unet(dtype: torch.dtype) -> UNet:
    """The full-size SD1.5 UNet with the random weights of ``bench/random_checkpoint.py``, without writing a file."""
    from random_checkpoint import random_tensor

    with torch.device("meta"):
        unet = UNet(SD15Config())
    g = torch.Generator().manual_seed(0)
    state = {k: random_tensor(k, list(v.shape), dtype, g) for k, v in unet.state_dict().items()}
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.eval().requires_grad_(False)
