"""The CUDA path (``@pytest.mark.cuda``: skipped where no CUDA GPU is visible; see conftest.py).

The reference is always the float32 CPU result of the tiny model; the GPU runs with TF32 off (conftest.py), so that
its float32 is float32.  Tolerances are sized from the same comparisons run on the CPU in each dtype:
UNet relative error 1.7e-3 in float16, 1.5e-2 in bfloat16; a stylized 64 px image within 1 level of 255 at most in
float32 (memory against recompute mode) and 1.7 levels on average in float16.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _ckpt_helpers import load_tiny, refs, rel_err
from _tiny import ASTRONAUT, gradient, write_config
from conftest import ROOT, TINY_HPARAMS, TINY_WEIGHTS
from magicstyle import load_config, load_model, stylize

pytestmark = pytest.mark.cuda
STYLE = ROOT / "examples" / "ihc.png"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_unet_on_cuda_matches_the_float32_cpu_output(dtype, tol):
    sd = load_tiny(device="cuda", dtype=dtype)
    assert {p.device.type for p in sd.unet.parameters()} == {"cuda"}
    r = refs()
    with torch.no_grad():
        for size in (16, 32):  # x on the GPU; t and the context as they come, on the CPU, in float32 and int64
            eps = sd.unet(r[f"unet.x{size}"].cuda(), r[f"unet.t{size}"], r["text.hidden"])
            assert eps.device.type == "cuda" and eps.dtype == dtype
            assert rel_err(eps.cpu(), r[f"unet.eps{size}"]) < tol


def _config(device: str, dtype: str, mode: str = "memory"):
    model = {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS), "device": device, "dtype": dtype}
    return load_config(None, {"size": 64, "steps": 4, "model": model, "store": {"mode": mode}})


@pytest.fixture(scope="module")
def cpu_image():
    return np.asarray(stylize(ASTRONAUT, STYLE, _config("cpu", "float32"))).astype(int)


@pytest.mark.parametrize("mode", ["memory", "recompute"])
def test_stylize_on_cuda(mode, cpu_image):
    """float32 on the GPU gives the CPU's image; float16 (what ``auto`` picks on CUDA) a close one."""
    for dtype, max_levels, mean_levels in (("float32", 4, 0.5), ("auto", 255, 6.0)):
        cfg = _config("cuda", dtype, mode)
        sd = load_model(cfg)
        assert next(sd.unet.parameters()).dtype == (torch.float32 if dtype == "float32" else torch.float16)
        assert next(sd.vae.parameters()).dtype == torch.float32  # fp16 SD VAEs overflow: auto keeps it in float32
        stats = {}
        image = np.asarray(stylize(ASTRONAUT, STYLE, cfg, sd=sd, stats=stats)).astype(int)
        assert stats["feature_store_bytes"] > 0 and stats["unet_evals"] == 8
        diff = np.abs(image - cpu_image)
        assert diff.max() <= max_levels and diff.mean() <= mean_levels, (dtype, diff.max(), diff.mean())


def test_cli_reports_peak_cuda_bytes(tmp_path):
    import train_free_run

    content = gradient(tmp_path / "portrait.png", (64, 64))
    config = write_config(tmp_path / "run.yaml", steps=2)
    report = tmp_path / "report.json"
    rc = train_free_run.main(["--content", str(content), "--style", str(ASTRONAUT), "--config", str(config),
                              "--device", "cuda", "--output", str(tmp_path / "out.png"), "--report", str(report),
                              "--quiet"])
    assert rc == 0
    data = json.loads(report.read_text())
    assert data["device"].startswith("cuda") and data["dtype"] == "float32"
    assert isinstance(data["peak_cuda_bytes"], int) and data["peak_cuda_bytes"] > 0
