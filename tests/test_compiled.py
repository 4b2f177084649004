"""The GPU fast path (``model.compile``, magicstyle/compiled.py) on the CPU: the switch, the store's step machinery that
keeps the recipes graph-friendly, and CSDI + FFF through a traced UNet giving the eager result.

Tracing is what can go wrong on any device (a graph break inside a recipe, a timestep baked into the graph that
recompiles every step, a recorded feature lost), so it is tested here with TorchDynamo + AOTAutograd and no code
generation (``aot_eager``): Inductor's C++ build would take minutes on CI's two cores.  ``fullgraph=True`` turns any
graph break into an error.  The UNet is a one-level SD1.5 UNet (same blocks, fewer of them), so tracing stays short.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _tiny import ASTRONAUT
from attention import FeatureStore
from conftest import ROOT, TINY_HPARAMS, TINY_WEIGHTS, needs_compile
from magicstyle import csdi, fff, load_config, load_model
from magicstyle.compiled import compile_seconds, compile_unet, runner, use_compile
from magicstyle.config import ConfigError, compile_supported
from magicstyle.pipeline import CountedUNet, encode_images, load_image
from models import SD15Config, UNet
from models.layers import set_prepack

TINY = {"size": 64, "steps": 2, "model": {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS),
                                          "dtype": "float32", "device": "cpu"}}


def test_compile_switch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("MAGICSTYLE_COMPILE_AUTO", "1")
    monkeypatch.setattr("magicstyle.compiled.compile_supported", lambda: True)  # whatever torch runs the suite
    assert use_compile("auto", cuda, jobs=100) and not use_compile("auto", cpu, jobs=100)
    assert not use_compile("auto", cuda) and not use_compile("auto", cuda, jobs=99)  # a one-shot run stays eager
    assert use_compile(True, cuda, jobs=1)
    monkeypatch.setenv("MAGICSTYLE_COMPILE_AUTO", "0")  # what the suite runs with (tests/conftest.py)
    assert not use_compile("auto", cuda, jobs=1000)
    assert use_compile(True, cpu) and not use_compile(False, cuda)
    for bad in ("yes", 1):
        with pytest.raises(ConfigError, match="model.compile"):
            load_config(None, {**TINY, "model": {**TINY["model"], "compile": bad}})
    assert load_config(None, TINY).model.compile == "auto"


@pytest.mark.parametrize("version, supported", [("2.7.1+cu126", False), ("2.8.0a0+5228986c39.nv25.05", True),
                                                ("2.8.0", True), ("2.10.0", True), ("3.0.0", True)])
def test_model_compile_needs_torch_2_8(version, supported, monkeypatch):
    """Before 2.8 TorchDynamo dropped the compiled graphs whenever a run's recipe objects were freed (every run compiled
    again): there ``true`` is one line naming the version and what to do, and ``auto`` stays eager on a GPU."""
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setenv("MAGICSTYLE_COMPILE_AUTO", "1")
    assert compile_supported() is supported
    assert use_compile("auto", torch.device("cuda"), jobs=1000) is supported
    on = {**TINY, "model": {**TINY["model"], "compile": True}}
    if supported:
        assert load_config(None, on).model.compile is True
    else:
        with pytest.raises(ConfigError, match=r"model.compile=true needs torch 2\.8 or newer \(this is torch 2\.7\.1"
                                              r"\+cu126\).*set model.compile=false"):
            load_config(None, on)


@needs_compile
def test_model_compile_attaches_a_runner_only_when_on():
    sd = load_model(load_config(None, TINY))  # auto on the CPU: eager
    assert runner(sd.unet) is sd.unet and "compiled" not in sd.unet.__dict__
    on = load_model(load_config(None, {**TINY, "model": {**TINY["model"], "compile": True}}))
    assert runner(on.unet) is on.unet.__dict__["compiled"] and runner(on.unet, eager=True) is on.unet
    assert CountedUNet(on.unet, eager=True).run is on.unet
    assert set(on.unet.state_dict()) == set(sd.unet.state_dict())  # not a submodule: the checkpoint keys are unchanged


def test_store_steps_file_pending_features_as_copies():
    """What a compiled ``record`` leaves in ``pending`` is kept under (layer, t) by the next step, as a copy in the
    store's dtype; ``current`` holds the step's features for the recipes; no timestep is read inside the graph."""
    store = FeatureStore(dtype=torch.float16, images=1, timesteps={11, 21}, pairs=[(0, 0)])
    store.step(21)
    assert store.on and store.current == {}
    x = torch.randn(2, 3, 4)
    store.pending["a"] = x[-1:]  # what record does inside a compiled UNet
    store.step(11)
    [kept] = store.features[("a", 21)]  # one tensor per image
    assert kept.dtype == torch.float16 and kept.data_ptr() != x.data_ptr() and torch.equal(kept, x[-1].half())
    assert store.on and store.current == {} and store.pending == {}
    store.step(1)  # not a recorded step
    assert not store.on and store.current == {}
    store.step(21)
    assert store.current.keys() == {"a"}
    assert all(torch.equal(h, kept[None]) for h in store.current["a"])  # (h_c, h_s), per pair: (1, tokens, C) each
    store.pairs = []  # a store that records (CSDI's) reads nothing
    store.step(21)
    assert store.on and store.current == {}
    store.step(None)
    assert not store.on and store.t is None


@pytest.fixture(scope="module")
def mini():
    """The tiny checkpoint's VAE and text encoder with a one-level UNet (random weights)."""
    cfg = load_config(None, TINY)
    sd = load_model(cfg)
    torch.manual_seed(0)
    one_level = SD15Config(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,), context_dim=32)
    unet = UNet(one_level)
    sd = dataclasses.replace(sd, unet=unet.eval().requires_grad_(False))
    images = torch.cat([load_image(ASTRONAUT, 64), load_image(ROOT / "examples" / "ihc.png", 64)])
    return sd, encode_images(sd, images)


@needs_compile
def test_csdi_and_fff_traced_give_the_eager_result_without_recompiling(mini):
    """Memory mode, FFA in every layer, guidance 5: one graph for CSDI (recording), one for FFF (reading), the same
    two graphs for every step and for a second run, and the eager latents."""
    from torch._dynamo.testing import CompileCounterWithBackend

    sd, z0 = mini
    cfg = load_config(None, {**TINY, "ffa": {"layers": "all"}})
    set_prepack(sd.unet, False)  # what compile_unet does on a CPU: the same kernels, eager and traced
    inversion = csdi(sd, z0, cfg)
    eager = fff(sd, inversion, cfg)
    counter = CompileCounterWithBackend("aot_eager")
    compile_unet(sd.unet, backend=counter, fullgraph=True)
    try:
        for run in range(2):
            before = compile_seconds()
            traced_inversion = csdi(sd, z0, cfg)
            traced = fff(sd, traced_inversion, cfg)
            assert counter.frame_count == 2, f"run {run}: {counter.frame_count} graphs"
            assert (compile_seconds() > before) == (run == 0)  # what stylize reports as seconds.compile
        assert traced_inversion.store.features.keys() == inversion.store.features.keys()
        for key, h in inversion.store.features.items():
            torch.testing.assert_close(traced_inversion.store.features[key], h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
    finally:
        sd.unet.__dict__.pop("compiled")


@needs_compile
@pytest.mark.parametrize("mode", ["memory", "recompute"])
def test_a_grid_batch_of_other_images_replays_the_fff_graph(mini, mode):
    """A grid runs FFF batch after batch, each pairing other images (a boundary between contents falls anywhere in a
    batch).  The graph reads each pair's images through the store (memory mode: features stacked per pair; recompute
    mode: index tensors into the reference rows), so a new graph comes only with a new batch shape: a new number of
    pairs (recompute mode: or of reference rows), whichever images they pair and in whichever order."""
    from torch._dynamo.testing import CompileCounterWithBackend

    sd, z0 = mini
    z4 = torch.cat([z0, z0.flip(-1)])  # 4 images
    cfg = load_config(None, {**TINY, "ffa": {"layers": "all"}, "store": {"mode": mode}})
    set_prepack(sd.unet, False)
    inversion = csdi(sd, z4, cfg)
    # recompute mode's shapes (pairs, reference rows): (1, 2) x 3, then (2, 4) x 3
    batches = ([(0, 2)], [(2, 0)], [(1, 3)], [(0, 2), (1, 3)], [(1, 3), (0, 2)], [(0, 3), (2, 1)])
    eager = [fff(sd, inversion, cfg, pairs=pairs) for pairs in batches]
    counter = CompileCounterWithBackend("aot_eager")
    compile_unet(sd.unet, backend=counter, fullgraph=True)
    try:
        traced = [fff(sd, inversion, cfg, pairs=pairs) for pairs in batches]
        assert counter.frame_count == 2, f"{counter.frame_count} graphs"  # one for 1 pair, one for 2
        for a, b in zip(traced, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        sd.unet.__dict__.pop("compiled")


@needs_compile
@pytest.mark.parametrize("mode", ["memory", "recompute"])
def test_the_graph_reads_the_store_at_the_same_addresses_every_step(mini, mode, monkeypatch):
    """TorchDynamo takes what the recipes read through the UNet's attributes as static inputs, which CUDA graphs read
    in place at the address they were recorded with (a new address records the graph again).  So with a compiled
    UNet every step's stacked features (memory mode) and pair indices (recompute mode) sit in the runner's buffers:
    the same address at every step and every FFF call of the same shape, and the same latents as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    sd, z0 = mini
    cfg = load_config(None, {**TINY, "ffa": {"layers": "all"}, "store": {"mode": mode}})
    set_prepack(sd.unet, False)
    inversion = csdi(sd, z0, cfg)
    eager = fff(sd, inversion, cfg)
    addresses: dict = {}
    step = FeatureStore.step

    def recording(store, t):
        step(store, t)
        tensors = {**{(p, r): h for p, pair in store.current.items() for r, h in enumerate(pair)},
                   **({"compact": store.compact[0]} if store.compact is not None else {})}
        for key, tensor in tensors.items():
            addresses.setdefault(key, set()).add(tensor.data_ptr())

    monkeypatch.setattr(FeatureStore, "step", recording)
    compile_unet(sd.unet, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True)
    try:
        for _ in range(2):
            torch.testing.assert_close(fff(sd, inversion, cfg), eager, rtol=1e-5, atol=1e-5)
    finally:
        sd.unet.__dict__.pop("compiled")
    assert addresses and all(len(a) == 1 for a in addresses.values()), addresses
    if mode == "recompute":
        assert "compact" in addresses


@needs_compile
def test_a_sweep_of_a_recipe_setting_replays_one_graph(mini):
    """With a compiled UNet the recipes' float settings (ffa.alpha/beta, styleid.gamma/temperature) are 0-dim tensors
    in the runner's buffers, not constants of the graph: a beta sweep (the paper's Fig. 5) and a gamma sweep compile
    one FFF graph each (the recipe is part of the graph), and each value gives its eager latents."""
    from torch._dynamo.testing import CompileCounterWithBackend

    sd, z0 = mini
    set_prepack(sd.unet, False)
    inversion = csdi(sd, z0, load_config(None, {**TINY, "ffa": {"layers": "all"}}))
    sweep = [{"ffa": {"layers": "all", "alpha": 1 - beta, "beta": beta}} for beta in (0.2, 0.5, 0.9)]
    sweep += [{"ffa": {"layers": "all", "recipe": "styleid"}, "styleid": {"gamma": g, "temperature": 1 + g}}
              for g in (0.3, 0.75)]
    configs = [load_config(None, {**TINY, **overrides}) for overrides in sweep]
    eager = [fff(sd, inversion, cfg) for cfg in configs]
    assert not torch.allclose(eager[0], eager[2])  # the values matter
    counter = CompileCounterWithBackend("aot_eager")
    compile_unet(sd.unet, backend=counter, fullgraph=True)
    try:
        for cfg, want in zip(configs, eager):
            torch.testing.assert_close(fff(sd, inversion, cfg), want, rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 2, f"{counter.frame_count} graphs"  # one for ffa, one for styleid
    finally:
        sd.unet.__dict__.pop("compiled")


def test_reading_a_tensor_into_a_given_buffer():
    """The loader's path to a GPU reads each tensor into a (pinned) buffer it reuses: same values as a fresh read."""
    from models.safetensors_file import SafetensorsFile

    file = SafetensorsFile(TINY_WEIGHTS)
    buffer = torch.full((1 << 20,), 255, dtype=torch.uint8)
    for key in list(file.shapes)[:40]:
        if file.nbytes(key) <= buffer.numel():
            got = file.tensor(key, out=buffer)
            assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, file.tensor(key)), key


def test_a_run_does_not_import_torchdynamo():
    """Start-up (issue 11): loading and a whole stylization never import TorchDynamo (seconds) unless model.compile is
    on: the loader builds its modules without running their initialisers (models/loader.py ``without_init``)."""
    import subprocess
    import sys

    code = ("import sys, torch; from magicstyle import stylize; "
            f"stylize({str(ASTRONAUT)!r}, {str(ASTRONAUT)!r}, {TINY!r}); print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
