"""Shared helpers of tests/test_cli.py and tests/test_images.py: the tiny SD1.5 fixture as a run configuration, and
small images generated on the fly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from conftest import ROOT, TINY_HPARAMS, TINY_WEIGHTS
ASTRONAUT = ROOT / "examples" / "astronaut.png"


def write_config(path: Path, *, size: int = 64, steps: int = 2, weights: Path | None = TINY_WEIGHTS,
                 extra: str = "") -> Path:
    """A YAML run configuration for the tiny checkpoint (float32 so that results are exact and fast on CPU).
    ``weights=None`` leaves model.weights at its default (weights/... in the repository)."""
    lines = [f"size: {size}", f"steps: {steps}", "model:"]
    if weights is not None:
        lines.append(f"  weights: {Path(weights).resolve()}")
    lines += [f"  hparams: {TINY_HPARAMS.resolve()}", "  dtype: float32"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def gradient(path: Path, size: tuple[int, int] = (80, 64), flip: bool = False) -> Path:
    """A width x height RGB gradient image (red across, green down, blue constant), saved at ``path``."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.float32)[None, :].round().astype(np.uint8)
    a[..., 1] = np.linspace(0, 255, h, dtype=np.float32)[:, None].round().astype(np.uint8)
    a[..., 2] = 96
    if flip:
        a = 255 - a
    Image.fromarray(a, "RGB").save(path)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> contents): compare before/after to see what a command wrote."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_half_way(monkeypatch, failure: BaseException) -> list[int]:
    """Files that ``magicstyle.output`` writes get half of each write, then ``failure`` is raised: a disk that fills
    (an OSError) or Ctrl-C (KeyboardInterrupt) during the write.  Returns the list of byte counts written so far."""
    import os

    from magicstyle import output

    real_fdopen, written = os.fdopen, []

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            written.append(len(data) // 2)
            raise failure

    monkeypatch.setattr(output.os, "fdopen", lambda fd, *a, **k: HalfWritten(real_fdopen(fd, *a, **k)))
    return written
