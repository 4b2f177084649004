"""torchrun: how the jobs are dealt to ranks, and a rank killed mid-run (the rerun finishes the grid, redoing nothing).

The runs spawn 2 processes through ``python -m torch.distributed.run`` with the gloo backend on the CPU, on a free
port of 127.0.0.1, bounded by a timeout.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from itertools import product
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from _tiny import gradient, write_config
from conftest import ROOT
from magicstyle import ConfigError, shard
from magicstyle.shard import deal

STYLE = ROOT / "examples" / "ihc.png"


def fake_jobs(contents: int, styles: int, settings: int, skip=()) -> list:
    """Jobs as ``make_jobs`` orders them (content-major), without the ones in ``skip`` (already done)."""
    jobs = [SimpleNamespace(content=SimpleNamespace(path=f"c{c}"), style=SimpleNamespace(path=f"s{s}"), setting=k)
            for c, s, k in product(range(contents), range(styles), range(settings))]
    return [j for i, j in enumerate(jobs) if i not in skip]


def names(share: list) -> list[str]:
    return [f"{j.content.path}{j.style.path}{j.setting}" for j in share]


def test_jobs_are_dealt_by_content_and_balanced_by_size():
    # a resumed run: content 0 has 4 pending jobs, contents 1 and 2 one each
    jobs = fake_jobs(3, 2, 2, skip={4, 5, 6, 8, 9, 10})
    shares = deal(jobs, 2)
    assert names(shares[0]) == ["c0s00", "c0s01", "c0s10", "c0s11"]  # the largest group alone
    assert names(shares[1]) == ["c1s11", "c2s11"]  # round robin would have put c2 beside c0
    for ranks in (1, 2, 3, 5):
        shares = deal(jobs, ranks)
        assert sorted(n for s in shares for n in names(s)) == sorted(names(jobs))  # every job exactly once
        assert all(names(s) == [n for n in names(jobs) if n in names(s)] for s in shares)  # in the run's order
    # fewer contents than ranks: by style (each style inverted once); fewer pairs than ranks: job by job
    assert [sorted({j.style.path for j in s}) for s in deal(fake_jobs(1, 3, 1), 3)] == [["s0"], ["s1"], ["s2"]]
    assert [names(s) for s in deal(fake_jobs(1, 1, 4), 2)] == [["c0s00", "c0s02"], ["c0s01", "c0s03"]]
    assert deal([], 2) == [[], []]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Rank 1 kills itself (SIGKILL: no clean-up of any kind) right after writing the PNG of its first job.
DIE_AFTER_FIRST_JOB = """
import os, signal, sys
sys.path.insert(0, {root!r})
import magicstyle.batch as batch
import train_free_run

save_png = batch.save_png

def save_and_die(*args, **kwargs):
    save_png(*args, **kwargs)
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)

batch.save_png = save_and_die
sys.exit(train_free_run.main(sys.argv[1:]))
"""


def torchrun(script, argv, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, argv)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_rank_killed_mid_run_loses_only_its_unfinished_jobs(tmp_path):
    contents = tmp_path / "contents"
    contents.mkdir()
    gradient(contents / "a.png", (64, 64))
    gradient(contents / "b.png", (64, 64), flip=True)
    out, report = tmp_path / "run", tmp_path / "report.json"
    argv = ["--content", contents, "--style", STYLE, "--config", write_config(tmp_path / "run.yaml"), "--device",
            "cpu", "--sweep", "ffa.beta=0,1", "batch.pairs=1", "--output", out, "--report", report]
    dying = tmp_path / "dying.py"
    dying.write_text(DIE_AFTER_FIRST_JOB.format(root=str(ROOT)))

    first = torchrun(dying, argv, tmp_path)
    assert first.returncode != 0, first.stderr[-3000:]
    assert not (out / "index.json").exists()  # rank 0 never got past the barrier
    kept = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert "b_ihc_ffa.beta=0.png" in kept and "b_ihc_ffa.beta=1.png" not in kept  # rank 1: first job only
    for name in kept:  # every file there is complete (written atomically)
        with Image.open(out / name) as img:
            img.load()

    second = torchrun(ROOT / "train_free_run.py", argv, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    jobs = json.loads((out / "index.json").read_text())["jobs"]
    assert sorted(j["output"] for j in jobs) == sorted(f"{c}_ihc_ffa.beta={b}.png" for c in "ab" for b in (0, 1))
    assert {j["output"] for j in jobs if j["status"] == "skipped"} == set(kept)
    assert {j["status"] for j in jobs if j["output"] not in kept} == {"done"}
    for name, (data, mtime) in kept.items():  # finished jobs were not redone
        assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == mtime
    r = json.loads(report.read_text())
    assert (r["ranks"], r["jobs_done"], r["jobs_skipped"]) == (2, 4 - len(kept), len(kept))
    # each pending job ran exactly once: 2 steps x (1 row per image inverted + 2 guidance rows per job generated)
    assert r["unet_rows"] == 2 * (r["images_inverted"] + 2 * r["jobs_done"])
    assert "rank 1/2:" in second.stderr and "rank 0/2:" in second.stderr  # per-rank log lines


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="--nproc_per_node=1, or --device cpu"):
        shard.start("auto")


def test_rank_0_draws_one_bar_for_the_whole_run(tmp_path):
    others = [tmp_path / "x.png", tmp_path / "y.png"]  # the other ranks' jobs
    others[0].write_bytes(b"finished by rank 1")
    stream = io.StringIO()
    bar = shard.RunProgress(others, total=4, stream=stream)
    bar.begin("jobs", 1)  # run_jobs begins it with rank 0's own share ...
    bar.update(1)  # ... and counts its own jobs; the bar adds the other ranks' finished outputs
    assert stream.getvalue().split("\r")[-1].startswith("jobs        2/4")
    assert bar.others == [others[1]]  # an output seen once is not looked for again (a big grid: jobs x updates)
    others[1].write_bytes(b"finished by rank 2")
    bar.update(1)
    assert stream.getvalue().split("\r")[-1].startswith("jobs        3/4") and bar.others == []
    bar.finish()
    assert stream.getvalue().split("\r")[-1].startswith("jobs        4/4") and stream.getvalue().endswith("\n")


def test_a_rank_line_during_the_bar_starts_its_own_line(monkeypatch, capsys):
    """Rank 0 logs its line while the run's bar is still mid-line: the line starts on a line of its own."""
    from magicstyle import shard
    from magicstyle.progress import Progress

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    bar = Progress(stream=sys.stderr)
    bar.begin("jobs", 6)
    bar.update(3)
    shard.log("3 jobs done, 0 failed, of 3")
    err = capsys.readouterr().err
    assert "\nrank 0/2: 3 jobs done" in err, repr(err)
