"""Many images per inversion and many pairs per UNet batch: the pipeline API of CSDI/FFF (csdi over N images,
Inversion.select / Inversion.cat, fff(..., pairs=...), inversion_key)."""
from __future__ import annotations

import pytest
import torch

from _tiny import ASTRONAUT
from conftest import ROOT, TINY_HPARAMS, TINY_WEIGHTS
from magicstyle import ConfigError, Inversion, csdi, fff, inversion_key, load_config, load_model
from magicstyle.pipeline import decode_latents, encode_images, load_image

IMAGES = [ASTRONAUT, ROOT / "examples" / "ihc.png", ROOT / "examples" / "hubble_deep_field.jpg",
          ROOT / "examples" / "grace_hopper.jpg"]
# Contents and styles shared between pairs, an image that is content in one pair and style in another, and a pair
# whose content is its style: the rows need per-row features, not one broadcast pair.
PAIRS = [(0, 1), (3, 2), (0, 2), (1, 1)]
TINY = {"size": 64, "steps": 3, "model": {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS),
                                          "dtype": "float32", "device": "cpu"}}


def config(**over):
    merged = {**TINY, **over}
    merged["model"] = {**TINY["model"], **over.get("model", {})}
    return load_config(None, merged)


@pytest.fixture(scope="module")
def sd():
    return load_model(config())


@pytest.fixture(scope="module")
def z0(sd):
    return encode_images(sd, torch.cat([load_image(path, 64) for path in IMAGES]))  # (4, 4, 8, 8)


def assert_same_images(sd, a, b):
    """float32 rounding differs with the batch shape (in float64 the two agree exactly); a random tiny UNet amplifies
    it, still far inside 2/255 per pixel."""
    torch.testing.assert_close(a, b, rtol=0, atol=5e-3)  # latents
    assert (decode_latents(sd, a) - decode_latents(sd, b)).abs().max() <= 2 / 255 * 2  # 2/255 per pixel in [-1, 1]


@pytest.mark.parametrize("mode", ["memory", "recompute"])
def test_pairs_in_one_batch_equal_the_pairs_one_at_a_time(sd, z0, mode):
    cfg = config(store={"mode": mode})
    inversion = csdi(sd, z0, cfg)
    batched = fff(sd, inversion, cfg, pairs=PAIRS)
    assert batched.shape == (len(PAIRS), 4, 8, 8)
    alone = torch.cat([fff(sd, inversion, cfg, pairs=[pair]) for pair in PAIRS])
    assert_same_images(sd, batched, alone)
    # and each equals today's two-image call on an inversion of just its content and style
    c, s = PAIRS[1]
    assert_same_images(sd, batched[1:2], fff(sd, csdi(sd, z0[[c, s]], cfg), cfg))


def test_recompute_runs_each_image_once_per_batch(sd, z0):
    cfg, steps = config(store={"mode": "recompute"}), 3
    counts = {}
    inversion = csdi(sd, z0, cfg, stats=counts)
    fff(sd, inversion, cfg, pairs=PAIRS, stats=counts)
    assert counts["invert_unet_rows"] == steps * len(IMAGES)
    # guidance 5: 2 rows per pair, plus one reference row per distinct image, not two per pair
    assert counts["generate_unet_calls"] == steps
    assert counts["generate_unet_rows"] == steps * (2 * len(PAIRS) + 4)
    fff(sd, inversion, cfg, pairs=[(0, 2), (0, 1)], stats=counts)
    assert counts["generate_unet_rows"] == steps * (2 * 2 + 3)


@pytest.mark.parametrize("mode", ["memory", "recompute"])
def test_select_and_cat(sd, z0, mode):
    cfg = config(store={"mode": mode})
    inversion = csdi(sd, z0, cfg)
    assert len(inversion) == 4
    merged = Inversion.cat([inversion.select([0, 1]), inversion.select([2, 3])])
    assert torch.equal(merged.z_T, inversion.z_T) and merged.store.nbytes == inversion.store.nbytes
    for key, value in {**inversion.store.features, **inversion.store.latents}.items():  # one tensor per image
        got = {**merged.store.features, **merged.store.latents}[key]
        assert len(got) == len(value) == 4 and all(a is b for a, b in zip(got, value))  # the same tensors, no copies
    picked = inversion.select([3, 2])
    for per_image in (*picked.store.features.values(), *picked.store.latents.values()):  # memory of their own: the
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in per_image)  # rest can go
    assert torch.equal(fff(sd, picked, cfg), fff(sd, inversion, cfg, pairs=[(3, 2)]))
    with pytest.raises(ConfigError, match="merged"):
        Inversion.cat([inversion, csdi(sd, z0[:1], config(store={"mode": mode}, steps=2))])
    with pytest.raises(ConfigError, match="merged"):  # another inversion prompt: recompute's reference rows differ
        Inversion.cat([inversion, csdi(sd, z0[:1], config(store={"mode": mode}, inversion={"prompt": "x"}))])
    # the same prompt's embedding to within rounding (a cache entry from another GPU) merges; another prompt does not
    other = inversion.select([1])
    for context, merges in ((other.context * (1 + 1e-4), True), (other.context.flip(1), False)):
        other.context = context
        if merges:
            assert len(Inversion.cat([inversion.select([0]), other])) == 2
        else:
            with pytest.raises(ConfigError, match="prompt"):
                Inversion.cat([inversion.select([0]), other])
    with pytest.raises(ConfigError, match="pair"):
        fff(sd, inversion, cfg, pairs=[(0, 4)])
    with pytest.raises(IndexError):
        inversion.select([5])


def test_memory_mode_keeps_one_input_per_image_layer_and_step(sd, z0):
    inversion = csdi(sd, z0, config())
    assert len(inversion.store.features) == 3 * len(inversion.layers)
    assert all(len(h) == 4 and h[0].dim() == 2 for h in inversion.store.features.values())  # 4 x (tokens, C)


def test_inversion_key_with_the_run_files_keys_the_checkpoint_by_its_hash(tmp_path):
    """A disk cache outlives a checkpoint's name: with the run's files the key follows the bytes (fine-tunes of one
    size under one name differ; the same file under another name or path matches)."""
    a, b, c = (tmp_path / "model.safetensors", tmp_path / "copy" / "renamed.safetensors",
               tmp_path / "x" / "model.safetensors")
    a.write_bytes(b"fine-tune one")
    b.parent.mkdir()
    b.write_bytes(b"fine-tune one")
    c.parent.mkdir()
    c.write_bytes(b"fine-tune two")  # same name, same size, other weights
    key = lambda path: inversion_key(config(), {"model.weights": path})  # noqa: E731
    assert key(a) == key(b) != key(c)
    assert key(a) != inversion_key(config())  # without files: by name and size (the Python API's cheap key)


def test_inversion_key_takes_the_dtype_auto_resolves_to():
    """``auto`` keys as what it means on this machine: the same entry as the dtype named, never a GPU's float16."""
    from magicstyle.model import dtype_names

    auto = config(model={"dtype": "auto", "device": "cpu"})
    named = config(model={"dtype": dtype_names(auto)["model.dtype"], "device": "cpu"})
    assert inversion_key(auto) == inversion_key(named)
    assert inversion_key(auto) != inversion_key(config(model={"dtype": "float16", "device": "cpu"}))
    if not torch.cuda.is_available():  # a device this machine lacks: a key all the same (the config's text)
        assert len(inversion_key(config(model={"dtype": "auto", "device": "cuda"}))) == 20


def test_inversion_key_names_what_changes_csdi():
    base = inversion_key(config())
    assert base == inversion_key(config()) and len(base) == 20
    same = [config(ffa={"beta": 0.5, "alpha": 0.5}), config(generation={"prompt": "x"}),
            config(model={"device": "cpu", "prepack": False})]
    assert all(inversion_key(c) == base for c in same)
    other = [config(steps=4), config(size=128), config(inversion={"prompt": "x"}), config(inversion={"refine": 1}),
             config(ffa={"layers": "all"}), config(ffa={"timesteps": [0]}), config(store={"mode": "recompute"}),
             config(store={"dtype": "float32"}), config(model={"dtype": "bfloat16"}),
             config(inversion={"guidance": 2.0}), config(model={"clip_layer": "penultimate"}),
             config(model={"hparams": None})]
    keys = [inversion_key(c) for c in other]
    assert base not in keys and len(set(keys)) == len(keys)
    # recompute mode keeps every step's latent, which serves any layer and step
    recompute = inversion_key(config(store={"mode": "recompute"}))
    assert inversion_key(config(store={"mode": "recompute"}, ffa={"layers": "all", "timesteps": [1]})) == recompute
    # the seed counts only when the latent is a posterior sample
    assert inversion_key(config(seed=3)) == base
    sampled = {"sample_posterior": True}
    assert inversion_key(config(seed=3, inversion=sampled)) != inversion_key(config(inversion=sampled))


def test_batch_pairs_auto_is_one_on_the_cpu_and_what_fits_on_cuda():
    from types import SimpleNamespace

    from magicstyle.batch import MAX_AUTO_PAIRS, auto_pairs, pairs_per_batch
    cpu = SimpleNamespace(unet=torch.nn.Linear(1, 1))
    assert pairs_per_batch(config(), cpu) == 1  # auto
    assert pairs_per_batch(config(batch={"pairs": 3}), cpu) == 3
    gib, features = 2**30, 340 * 2**20  # one image's memory-mode features at 512 px, 30 steps
    # a pair at 512 px, float16 UNet, float32 VAE: 340 MiB + 2 rows x 192 MiB + 768 MiB = 1492 MiB
    assert auto_pairs(70 * gib, 512, features, 2, 2, 4) == MAX_AUTO_PAIRS
    assert auto_pairs(8 * gib, 512, features, 2, 2, 4) == int(0.8 * 8 * 1024 / 1492)
    assert auto_pairs(gib // 2, 512, features, 2, 2, 4) == 1  # never 0
    assert auto_pairs(8 * gib, 512, 0, 4, 2, 4) == int(0.8 * 8 * 1024 / 1536)  # recompute: no features, 4 rows
