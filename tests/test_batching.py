"""Runs at scale (issue: batch at scale): many pairs per UNet call, the inversion cache on disk, torchrun over
several processes.  The tiny SD1.5 fixture at 64 px; helpers and the ``inputs`` fixture are test_jobs.py's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny import gradient, write_config
from conftest import ROOT
from magicstyle import cache, load_config
from magicstyle.images import save_png
from magicstyle.parameters import png_parameters
from test_jobs import STYLE, cli, inputs, pngs_of, quietly  # noqa: F401 - inputs is a fixture


def test_torchrun_shards_the_jobs_over_two_ranks(inputs):
    """2 processes, gloo on the CPU: every pending job runs exactly once, on the rank of its content image; an
    output that exists (a job finished before a rank died) is skipped, not redone."""
    over = ["ffa.beta=1", "ffa.alpha=0.0", "model.device=cpu"]
    cfg = load_config(inputs.config, None, over)
    existing = inputs.output / "b_ihc_ffa.beta=1.png"
    parameters = png_parameters(cfg, {"model.weights": cfg.model.weights}, "b.png", STYLE.name)
    save_png(Image.new("RGB", (64, 64)), existing, parameters)  # as if a rank had finished it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_free_run.py",
         "--content", str(inputs.contents), "--style", str(STYLE), "--config", str(inputs.config), "--device", "cpu",
         "--sweep", "ffa.beta=0,1", "--output", str(inputs.output), "--report", str(inputs.tmp / "r.json"), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = json.loads((inputs.output / "index.json").read_text())["jobs"]
    assert [(j["output"], j["status"], j.get("rank")) for j in jobs] == [
        ("a_ihc_ffa.beta=0.png", "done", 0), ("a_ihc_ffa.beta=1.png", "done", 0),
        ("b_ihc_ffa.beta=0.png", "done", 1), ("b_ihc_ffa.beta=1.png", "skipped", None)]
    assert pngs_of([existing])[0].max() == 0  # not redone
    r = json.loads((inputs.tmp / "r.json").read_text())
    assert (r["ranks"], r["jobs_done"], r["jobs_skipped"], r["images_inverted"]) == (2, 3, 1, 4)  # style on both


def pngs(folder) -> dict:
    out = {}
    for p in sorted(folder.glob("*.png")):
        if p.name != "grid.png":
            with Image.open(p) as img:
                out[p.name] = np.asarray(img.convert("RGB")).astype(int)
    return out


def test_pairs_batched_in_one_unet_call_give_the_same_images(inputs):
    """batch.pairs=2: both contents inverted in one batch and both pairs in one FFF batch; same images (2/255)."""
    base = ["--content", inputs.contents, "--style", STYLE, "--config", inputs.config, "--steps", "1"]
    reports = []
    for k in (1, 2):
        rc, err = quietly([*base, f"batch.pairs={k}", "--output", inputs.tmp / f"k{k}", "--report",
                           inputs.tmp / f"k{k}.json"])
        assert rc == 0, err
        reports.append(json.loads((inputs.tmp / f"k{k}.json").read_text()))
    one, two = pngs(inputs.tmp / "k1"), pngs(inputs.tmp / "k2")
    assert one.keys() == two.keys() and len(one) == 2
    assert max(np.abs(one[k] - two[k]).max() for k in one) <= 2
    assert reports[0]["unet_rows"] == reports[1]["unet_rows"]  # the same work...
    assert reports[1]["unet_evals"] < reports[0]["unet_evals"]  # ...in fewer, larger UNet calls
    assert reports[1]["images_inverted"] == 3


def test_the_inversion_cache_is_reused_and_a_corrupt_entry_recomputed(inputs, capsys):
    folder = inputs.tmp / "cache"
    argv = ["--content", inputs.contents, "--style", STYLE, "--config", inputs.config, "--steps", "1",
            "store.mode=recompute", f"batch.cache={folder}", "--output", inputs.output, "--quiet"]

    def run(name, *extra):
        assert cli([*argv, *extra, "--report", inputs.tmp / name]) == 0
        r = json.loads((inputs.tmp / name).read_text())
        return r["images_inverted"], r["images_from_cache"]

    assert run("first.json") == (3, 0)
    entries = sorted(folder.iterdir())
    assert len(entries) == 3 and all(e.suffix == ".safetensors" for e in entries)
    first = pngs(inputs.output)
    assert run("second.json", "--overwrite") == (0, 3)  # another run, the same cache: no inversion at all
    assert max(np.abs(first[k] - v).max() for k, v in pngs(inputs.output).items()) <= 1
    data = bytearray(entries[0].read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    entries[0].write_bytes(bytes(data))
    capsys.readouterr()
    assert run("third.json", "--overwrite") == (1, 2)
    notes = [line for line in capsys.readouterr().err.splitlines() if "corrupt" in line]
    assert len(notes) == 1 and entries[0].name in notes[0] and "checksum" in notes[0] and "recomputing" in notes[0]
    assert cache.load(entries[0], torch.device("cpu")) is not None  # rewritten, intact
    assert sorted(folder.iterdir()) == entries  # no temporary files


def test_a_cache_entry_round_trips_and_concurrent_writers_leave_one_valid_entry(tmp_path):
    import multiprocessing

    from magicstyle import load_config, load_model
    from magicstyle.pipeline import csdi, encode_images, fff, load_image
    cfg = load_config(write_config(tmp_path / "tiny.yaml", steps=2), {"model": {"device": "cpu"}})
    sd = load_model(cfg)
    inv = csdi(sd, encode_images(sd, torch.cat([load_image(STYLE, 64), load_image(inputs_image(tmp_path), 64)])), cfg)
    back = cache.decode(cache.encode(inv), torch.device("cpu"))  # memory mode: the recorded features too
    assert back.store.features.keys() == inv.store.features.keys() and back.timesteps == inv.timesteps
    torch.testing.assert_close(fff(sd, back, cfg, pairs=[(1, 0)]), fff(sd, inv, cfg, pairs=[(1, 0)]), rtol=0, atol=0)

    path = tmp_path / "entry.safetensors"
    writers = [multiprocessing.get_context("fork").Process(target=_write_many, args=(path, inv.select([i])))
               for i in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert len(cache.load(path, torch.device("cpu"))) == 1


def _write_many(path, inv):
    for _ in range(10):
        cache.save(path, inv)


def inputs_image(tmp_path):
    return gradient(tmp_path / "c.png", (64, 64))


@pytest.mark.parametrize("cached", [False, True])
def test_invert_gives_one_inversion_in_the_order_of_the_paths(tmp_path, monkeypatch, cached):
    """``batch.invert`` of 6 images (CSDI batches of 4 and 2): one inversion, rows in the order of the paths; with an
    empty cache, each image file hashed once (its entry's name) and one entry written per image, holding its row."""
    from collections import Counter
    from types import SimpleNamespace

    import magicstyle.batch as batch
    import magicstyle.pipeline as pipeline

    class Inv:  # an inversion's rows, standing for its images
        def __init__(self, rows):
            self.rows = rows

        def select(self, indices):
            return Inv([self.rows[i] for i in indices])

        @staticmethod
        def cat(parts):
            return Inv([r for p in parts for r in p.rows])

    hashed, saved = Counter(), {}
    monkeypatch.setattr(cache, "hash_file", lambda path: hashed.update([path]) or f"{len(hashed):064d}")
    monkeypatch.setattr(cache, "save", lambda path, inv: saved.setdefault(path, inv.rows))
    monkeypatch.setattr(batch, "csdi", lambda run, paths, cfg: Inv(list(paths)))
    monkeypatch.setattr(pipeline, "Inversion", Inv)
    over = {"store": {"mode": "recompute"}, **({"batch": {"cache": str(tmp_path / "cache")}} if cached else {})}
    cfg = load_config(write_config(tmp_path / "tiny.yaml"), over)
    paths = [tmp_path / f"{i}.png" for i in range(6)]
    run = SimpleNamespace(sd=None, counts=Counter(), files=None)
    assert batch.invert(run, paths, cfg).rows == paths
    if cached:
        assert hashed == Counter(paths)  # once per image
        assert sorted(saved.values()) == [[p] for p in sorted(paths)]
    else:
        assert not hashed and not saved
    assert batch.invert(run, paths[4:] + paths[:2], cfg).rows == paths[4:] + paths[:2]  # another order, one batch
    assert run.counts["images_from_cache"] == 0
