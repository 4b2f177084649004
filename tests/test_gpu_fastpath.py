"""The GPU fast path on a GPU (skipped without one; run with ``pytest -m cuda``, see bench/gpu_session.sh): loading
through pinned memory, and CSDI + FFF through the compiled UNet (Inductor, CUDA graphs) against eager."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _tiny import ASTRONAUT
from conftest import ROOT, TINY_HPARAMS, TINY_WEIGHTS, needs_compile
from magicstyle import csdi, fff, load_config, load_model
from magicstyle.compiled import compile_unet
from magicstyle.pipeline import encode_images, load_image
from models import SD15Config, UNet, load_sd15

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TINY = {"size": 64, "steps": 2, "model": {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS),
                                          "dtype": "float32", "device": "cuda", "compile": False}}


def test_pinned_asynchronous_load_gives_the_checkpoint():
    cpu = load_sd15(TINY_WEIGHTS, hparams=TINY_HPARAMS, device="cpu", dtype=torch.float16)
    gpu = load_sd15(TINY_WEIGHTS, hparams=TINY_HPARAMS, device="cuda", dtype=torch.float16)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(cpu, part).state_dict(), getattr(gpu, part).state_dict()
        assert want.keys() == got.keys()
        for key in want:
            assert got[key].is_cuda and torch.equal(got[key].cpu(), want[key]), key


@needs_compile
@pytest.mark.parametrize("mode", ["memory", "recompute"])
def test_compiled_unet_gives_the_eager_latents(mode, monkeypatch):
    """Inductor + CUDA graphs on a one-level UNet (a short compile): the same latents as eager, and a second run that
    compiles nothing and records no CUDA graph, only replays (features kept by CSDI are copies, not a graph's buffers;
    the store's per-step tensors stay at the addresses the graphs were recorded with)."""
    import torch._inductor.cudagraph_trees as trees

    from magicstyle.compiled import compile_seconds

    records = []
    record = getattr(trees.CUDAGraphTreeManager, "record_function", None)  # a private name: counted where it exists
    if record is not None:
        monkeypatch.setattr(trees.CUDAGraphTreeManager, "record_function",
                            lambda self, *a, **k: records.append(1) or record(self, *a, **k))
    cfg = load_config(None, {**TINY, "ffa": {"layers": "all"}, "store": {"mode": mode}})
    sd = load_model(cfg)
    torch.manual_seed(0)
    one_level = SD15Config(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,), context_dim=32)
    unet = UNet(one_level)
    sd = dataclasses.replace(sd, unet=unet.cuda().eval().requires_grad_(False))
    images = torch.cat([load_image(ASTRONAUT, 64), load_image(ROOT / "examples" / "ihc.png", 64)])
    z0 = encode_images(sd, images)
    eager = fff(sd, csdi(sd, z0, cfg), cfg)
    compile_unet(sd.unet)
    for _ in range(2):  # the first run compiles and records; the second only replays
        compiled, recorded = compile_seconds(), len(records)
        inversion = csdi(sd, z0, cfg)
        z = fff(sd, inversion, cfg)
        torch.testing.assert_close(z, eager, rtol=1e-3, atol=1e-3)
    assert compile_seconds() == compiled, "the second run compiled again"
    assert len(records) == recorded, f"the second run recorded {len(records) - recorded} CUDA graphs instead of replaying"
    assert record is None or recorded > 0, "the first run recorded no CUDA graph"
