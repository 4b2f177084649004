"""The command line when a run cannot go on: a device that is not there, Ctrl-C in the middle of the work or of the
write, out of memory, a full disk.  One line on stderr, and the output folder exactly as it was; a bug keeps its
traceback."""
from __future__ import annotations


import pytest
import torch

import magicstyle.pipeline as pipeline
from _tiny import fail_half_way, tree
from test_cli import STEPS, argv, cli, existing, inputs  # noqa: F401  (inputs is a fixture)


def test_cuda_asked_for_without_a_gpu_is_one_line(inputs, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pipeline, "stylize", lambda *a, **k: pytest.fail("stylize ran"))
    before = tree(inputs.tmp)
    assert cli(argv(inputs, "--device", "cuda")) == 2  # (without --quiet the image notes come first: the jobs fix)
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "cuda" in err and "--device cpu" in err, err
    assert tree(inputs.tmp) == before


@pytest.mark.parametrize("when", ["generate", "write"])
def test_ctrl_c_during_a_run_leaves_no_partial_output(inputs, monkeypatch, capsys, when):
    """Ctrl-C in the middle of the UNet's work, or half-way through writing the PNG: exit status 130, one line, and
    the folder as it was (an existing output, replaced only with --overwrite, is untouched)."""
    if when == "generate":
        fail_in_the_unet(monkeypatch, KeyboardInterrupt())
    else:
        fail_half_way(monkeypatch, KeyboardInterrupt())
    existing(inputs.output, b"an old result")
    before = tree(inputs.tmp)
    assert cli(argv(inputs, "--overwrite", "--report", inputs.tmp / "out" / "report.json")) == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "interrupted" in err and "Traceback" not in err, err
    assert tree(inputs.tmp) == before


def fail_in_the_unet(monkeypatch, failure: BaseException) -> None:
    """The UNet raises ``failure`` at the first generation step (after CSDI's STEPS calls)."""
    from models.unet import UNet

    forward, calls = UNet.forward, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == STEPS + 1:
            raise failure
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", failing)


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
            "is free. Of the allocated memory 75.2 GiB is allocated by PyTorch, and 1.2 GiB is reserved but unallocated.")


@pytest.mark.parametrize("failure, words", [
    pytest.param(torch.cuda.OutOfMemoryError(CUDA_OOM), ["out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)",
                                                    "--size"], id="cuda-oom"),
    pytest.param(MemoryError(), ["out of memory (MemoryError)"], id="cpu-oom"),
    pytest.param(OSError(5, "Input/output error", "/mnt/lost"), ["OSError", "Input/output error", "/mnt/lost"],
                 id="io-error"),
    pytest.param(None, ["cannot write output", "No space left on device", "free some space"], id="disk-full"),
    pytest.param(2, ["cannot write output", "No such file or directory", "check that its folder exists"],
                 id="folder-gone"),
])
def test_a_run_that_fails_at_run_time_is_one_line_with_exit_status_1(inputs, monkeypatch, capsys, failure, words):
    """Out of memory in the UNet, an I/O error, the disk filling while the PNG is written: one line, exit status 1
    (as a failed job of a sweep), and nothing written (an existing output, replaced only with --overwrite, is
    untouched)."""
    if failure is None:
        fail_half_way(monkeypatch, OSError(28, "No space left on device"))
    elif failure == 2:  # the output's folder removed during the run
        fail_half_way(monkeypatch, OSError(2, "No such file or directory"))
    else:
        fail_in_the_unet(monkeypatch, failure)
    existing(inputs.output, b"an old result")
    before = tree(inputs.tmp)
    assert cli(argv(inputs, "--overwrite", "--report", inputs.tmp / "out" / "report.json")) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert tree(inputs.tmp) == before


def test_a_bug_keeps_its_traceback(inputs, monkeypatch):
    """A plain Python error is not dressed up as a one-line failure."""
    fail_in_the_unet(monkeypatch, TypeError("forward() got an unexpected keyword argument 'x'"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        cli(argv(inputs))
    assert not inputs.output.exists()


@pytest.mark.parametrize("failure, line", [(KeyboardInterrupt(), "interrupted; "),
                                           (OSError(5, "Input/output error"), "error: OSError")])
def test_the_message_after_an_unfinished_progress_bar_starts_its_own_line(inputs, monkeypatch, capsys, failure, line):
    """Ctrl-C (or a failure) while a bar is drawn: the bar's line is ended first, not ``... 00:13 < 01:06interrupted``."""
    import sys

    import magicstyle.run as run_module
    from magicstyle.progress import Progress

    def bar_then_fail(args):
        bar = Progress(stream=sys.stderr)
        bar.begin("jobs", 6)
        bar.update(1)
        raise failure

    monkeypatch.setattr(run_module, "_run", bar_then_fail)
    assert cli(argv(inputs)) in (1, 130)
    lines = capsys.readouterr().err.split("\n")
    assert lines[0].startswith("\rjobs") and lines[0].rstrip().endswith("00:00") and lines[1].startswith(line), lines


def test_a_note_during_a_bar_starts_its_own_line(capsys):
    import sys

    from magicstyle.progress import Progress, say

    bar = Progress(stream=sys.stderr)
    bar.begin("invert", 2)
    say("note: inversion cache entry x is corrupt; recomputing it")
    bar.update(2)
    say("wrote out.png")
    assert capsys.readouterr().err.split("\n")[1:] == ["note: inversion cache entry x is corrupt; recomputing it",
                                                       "\rinvert      2/2   [########################] 00:00 < 00:00",
                                                       "wrote out.png", ""]
