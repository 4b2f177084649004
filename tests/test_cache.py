"""The inversion cache's entries (``magicstyle/cache.py``): plain safetensors files that name what they hold, and
that are never used when damaged, truncated or made for another image or configuration.  The runs that reuse the
cache, and concurrent writers, are in tests/test_jobs.py."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open

from _tiny import ASTRONAUT
from conftest import TINY_HPARAMS, TINY_WEIGHTS
from magicstyle import cache, csdi, fff, inversion_key, load_config, load_model
from models.filehash import hash_file
from magicstyle.pipeline import encode_images, load_image
from models.safetensors_file import SafetensorsFile

CPU = torch.device("cpu")


def config(mode: str):
    return load_config(None, {"size": 64, "steps": 2, "store": {"mode": mode}, "batch": {"cache": "unused"},
                              "model": {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS),
                                        "dtype": "float32", "device": "cpu"}})


@pytest.fixture(scope="module")
def made():
    """(config, model, inversion of one image) per store mode."""
    out = {}
    for mode in ("recompute", "memory"):
        cfg = config(mode)
        sd = load_model(cfg)
        out[mode] = cfg, sd, csdi(sd, encode_images(sd, load_image(ASTRONAUT, 64)), cfg)
    return out


@pytest.mark.parametrize("mode", ["recompute", "memory"])
def test_an_entry_is_a_safetensors_file_that_names_its_image_and_key(made, mode, tmp_path):
    cfg, sd, inv = made[mode]
    path = tmp_path / cache.entry(ASTRONAUT, cfg).name
    cache.save(path, inv)
    with safe_open(str(path), "pt") as f:  # the safetensors library reads it ...
        meta = f.metadata()
    assert SafetensorsFile(path, "cache entry").shapes["z_T"] == (1, 4, 8, 8)  # ... and so does our strict reader
    assert meta["format"] == cache.FORMAT and meta["image_sha256"] == hash_file(ASTRONAUT)
    assert meta["inversion_key"] == inversion_key(cfg) and len(meta["sha256"]) == 64
    back = cache.load(path, CPU)
    assert back.timesteps == inv.timesteps and back.layers == inv.layers
    assert torch.equal(fff(sd, back, cfg, pairs=[(0, 0)]), fff(sd, inv, cfg, pairs=[(0, 0)]))


def test_a_damaged_entry_is_never_used(made, tmp_path, capsys):
    """Single flipped bits all over the file, and every kind of truncation: load says so in one line and returns
    None; never an inversion."""
    cfg, _, inv = made["recompute"]
    path = tmp_path / cache.entry(ASTRONAUT, cfg).name
    cache.save(path, inv)
    good = path.read_bytes()
    rng = random.Random(0)
    for position in sorted(rng.sample(range(len(good)), 60)) + [0, 8, len(good) - 1]:
        damaged = bytearray(good)
        damaged[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        assert cache.load(path, CPU) is None, f"a flipped bit at byte {position} went unnoticed"
    for length in (0, 4, 8, 20, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:length])
        assert cache.load(path, CPU) is None, f"an entry truncated to {length} bytes was used"
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 63 + 6 and all(n.startswith("note: inversion cache entry") and n.endswith("recomputing it")
                                         for n in notes)
    path.write_bytes(good)
    assert cache.load(path, CPU) is not None


def test_an_entry_under_another_name_is_not_used(made, tmp_path, capsys):
    """An entry copied or renamed to another image's or another configuration's name is refused (its metadata says
    what it was made for)."""
    cfg, _, inv = made["recompute"]
    path = tmp_path / cache.entry(ASTRONAUT, cfg).name
    cache.save(path, inv)
    image, key = cache.identity(path)
    for name in (f"{'0' * 64}-{key}{cache.SUFFIX}", f"{image}-{'0' * 20}{cache.SUFFIX}"):
        (tmp_path / name).write_bytes(path.read_bytes())
        assert cache.load(tmp_path / name, CPU) is None
    assert capsys.readouterr().err.count("made for another") == 2


def test_an_entry_that_cannot_be_written_is_a_note_and_the_run_goes_on(made, tmp_path, capsys):
    """A full disk or a read-only cache folder (a file in its place here) costs the cache, not the inversion."""
    cfg, _, inv = made["recompute"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker / cache.entry(ASTRONAUT, cfg).name
    cache.save(path, inv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: ") and "going on without caching it" in err, err
    assert blocker.read_text() == ""


def test_an_entry_is_named_by_the_checkpoint_bytes_not_its_name(tmp_path):
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    for path, data in ((a, b"fine-tune one"), (b, b"fine-tune two")):  # same name, same size, other weights
        path.parent.mkdir()
        path.write_bytes(data)
    cfg = load_config(None, {"model": {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS)},
                             "store": {"mode": "recompute"}, "batch": {"cache": str(tmp_path / "cache")}})
    assert cache.entry(ASTRONAUT, cfg, {"model.weights": a}) != cache.entry(ASTRONAUT, cfg, {"model.weights": b})
