"""The command line when a run cannot go on: a device that is not there, Ctrl-C in the middle of the work or of the
write.  One line on stderr, and the output folder exactly as it was."""
from __future__ import annotations


import pytest

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
    from models.unet import UNet

    if when == "generate":
        forward, calls = UNet.forward, []

        def interrupted(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == STEPS + 1:  # the first generation step
                raise KeyboardInterrupt
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(UNet, "forward", interrupted)
    else:
        fail_half_way(monkeypatch, KeyboardInterrupt())
    existing(inputs.output, b"an old result")
    before = tree(inputs.tmp)
    assert cli(argv(inputs, "--overwrite", "--report", inputs.tmp / "out" / "report.json")) == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "interrupted" in err and "Traceback" not in err, err
    assert tree(inputs.tmp) == before
