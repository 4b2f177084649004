"""Reading a safetensors file (models/safetensors_file.py ``SafetensorsFile``).  The header checks (issue 16): a damaged file is
refused with a CheckpointError that names the tensor and the rule, before any tensor is read, and a file the loader
accepts loads exactly what the ``safetensors`` library loads from it.  Errors of the file system (permission, I/O, a
FIFO) are CheckpointErrors too, also when the tests run as root.

Damaged copies of the tiny checkpoint are written by ``damaged`` (an edit of the parsed header, of its bytes, of the
header length, or bytes appended); the property test flips single bytes of a small file's header."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_free_run
from _ckpt_helpers import HPARAMS, TINY
from _tiny import gradient, write_config
from models import CheckpointError
from models.loader import UNET_PREFIX, SafetensorsFile, load_sd15


def parts(path: Path) -> tuple[bytes, bytes]:
    """(JSON header, data) of a safetensors file."""
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    return blob[8:8 + n], blob[8 + n:]


def in_order(header: dict) -> list[str]:
    """The tensor names of ``header`` in the order of their data."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def damaged(folder: Path, *, edit=None, text=None, data=None, length=None, source: Path = TINY) -> Path:
    """``source`` rewritten after ``edit(header)`` (in place), ``text(json_bytes)``, ``data(data_bytes)``, and with the
    header length ``length(true_length)``; the header is padded with spaces to a multiple of 8 bytes, as the format's
    writer does."""
    raw, payload = parts(source)
    header = json.loads(raw)
    if edit:
        edit(header)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw = text(raw) if text else raw
    raw += b" " * (-len(raw) % 8)
    payload = data(payload) if data else payload
    n = length(len(raw)) if length else len(raw)
    path = folder / "damaged.safetensors"
    path.write_bytes(struct.pack("<Q", n) + raw + payload)
    return path


def nth(i: int):
    """The name of the i-th tensor (in data order) of the tiny checkpoint."""
    return in_order(json.loads(parts(TINY)[0]))[i]


def shift(key: str, by: int):
    def edit(h):
        h[key]["data_offsets"] = [o + by for o in h[key]["data_offsets"]]
    return edit


def shift_from(i: int, by: int):
    """Move the data of the i-th and later tensors ``by`` bytes on (the bytes in between: zeros)."""
    def edit(h):
        for key in in_order(h)[i:]:
            h[key]["data_offsets"] = [o + by for o in h[key]["data_offsets"]]
    return edit


def insert_zeros(at_tensor: int, count: int):
    def data(payload):
        at = json.loads(parts(TINY)[0])[nth(at_tensor)]["data_offsets"][0]
        return payload[:at] + bytes(count) + payload[at:]
    return data


def set_entry(key: str, field: str | None, value):
    def edit(h):
        if field is None:
            h[key] = value
        else:
            h[key][field] = value
    return edit


def rename_field(key: str, old: str, new: str):
    def edit(h):
        h[key][new] = h[key].pop(old)
    return edit


A, B = nth(0), nth(1)  # the first two tensors in data order (position_ids I64 (1, 77), alphas_cumprod F32 (1000,))
SECOND_ENTRY = json.dumps({B: json.loads(parts(TINY)[0])[B]}, separators=(",", ":"))[1:-1].encode()

# id, damage, words the message must hold, whether the safetensors library refuses the file too
ISSUE_ROWS = [  # the table of issue 16
    ("header length one byte short", dict(text=lambda r: r + b" ", length=lambda n: n - 1),
     ["1 byte after the last tensor"], True),
    ("data_offsets overlap another tensor", dict(edit=shift(B, -8)), [B, "overlap", A], True),
    ("64 bytes appended", dict(data=lambda d: d + bytes(64)), ["64 bytes after the last tensor"], True),
    ("__metadata__ with a non-string value", dict(edit=lambda h: h["__metadata__"].update(format=1)),
     ["__metadata__", "'format'", "not a string"], True),
    ("data_offsets as strings", dict(edit=set_entry(B, "data_offsets", ["616", "4616"])),
     [B, "data_offsets", "two non-negative integers"], True),
    ("entry is a list", dict(edit=set_entry(B, None, ["F32", [1000], [616, 4616]])), [B, "not an object"], False),
    ("entry without data_offsets", dict(edit=rename_field(B, "data_offsets", "data_offsetz")),
     [B, "no data_offsets"], True),
]
OTHER_ROWS = [  # every other rule of the format
    ("unknown dtype", dict(edit=set_entry(B, "dtype", "F61")), [B, "dtype 'F61'"], True),
    ("dtype not a string", dict(edit=set_entry(B, "dtype", 32)), [B, "dtype 32"], True),
    ("negative dimension", dict(edit=set_entry(B, "shape", [-1000])), [B, "shape", "non-negative integers"], True),
    ("fractional dimension", dict(edit=set_entry(B, "shape", [1000.0])), [B, "shape", "non-negative integers"], True),
    ("boolean dimension", dict(edit=set_entry(B, "shape", [True])), [B, "shape", "non-negative integers"], True),
    ("shape not a list", dict(edit=set_entry(B, "shape", 1000)), [B, "shape", "non-negative integers"], True),
    ("three data_offsets", dict(edit=set_entry(B, "data_offsets", [616, 4616, 4616])), [B, "data_offsets"], True),
    ("negative data_offsets", dict(edit=set_entry(A, "data_offsets", [-616, 0])), [A, "data_offsets"], True),
    ("span is not numel x itemsize", dict(edit=set_entry(B, "shape", [999])), [B, "4000 bytes", "needs 3996"], True),
    ("end before begin", dict(edit=set_entry(B, "data_offsets", [4616, 616])), [B, "-4000 bytes"], True),
    ("size over 2^64", dict(edit=set_entry(B, "shape", [2 ** 40, 2 ** 40, 0])), [B, "2^64"], True),
    ("dimension over 2^64", dict(edit=set_entry(B, "shape", [0, 2 ** 64])), [B, "shape"], True),
    ("first tensor not at byte 0", dict(edit=shift_from(0, 8), data=lambda d: bytes(8) + d), [A, "start at 0"], True),
    ("gap between tensors", dict(edit=shift_from(1, 8), data=insert_zeros(1, 8)), [B, "gap", A], True),
    ("tensors end past the end of the file", dict(data=lambda d: d[:-2]), ["truncated"], True),
    ("header length past the end of the file", dict(length=lambda n: 20_000_000), ["truncated"], True),
    ("header length over the format's limit", dict(length=lambda n: 2 ** 40), ["limit"], True),
    ("header is not UTF-8", dict(text=lambda r: r.replace(b"alphas_cumprod", b"alphas_cumpr\xff", 1)),
     ["not a safetensors file", "UTF-8"], True),
    ("header is not one JSON value", dict(text=lambda r: r + b"\0"), ["not a safetensors file", "Extra data"], True),
    ("NaN in the header", dict(text=lambda r: r.replace(b'"pt"', b"NaN", 1)), ["not a safetensors file", "NaN"], True),
    ("lone surrogate escape", dict(text=lambda r: r.replace(b"alphas", b"\\ud800", 1)),
     ["not a safetensors file", "surrogate"], True),
    ("duplicate tensor name", dict(text=lambda r: r[:1] + SECOND_ENTRY + b"," + r[1:]), ["duplicate key", B], False),
    ("duplicate field in an entry", dict(text=lambda r: r.replace(b'"dtype":"I64"', b'"dtype":"I64","dtype":"I64"')),
     ["duplicate key 'dtype'"], True),
    ("duplicate __metadata__", dict(text=lambda r: r[:1] + b'"__metadata__":{},' + r[1:]),
     ["duplicate key '__metadata__'"], True),
    ("__metadata__ not a map", dict(edit=lambda h: h.update(__metadata__=["pt"])), ["__metadata__", "not a map"], True),
]


def row_params(rows):
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


@pytest.mark.parametrize("damage, words, library_refuses", row_params(ISSUE_ROWS + OTHER_ROWS))
def test_damaged_header_is_refused_naming_tensor_and_rule(tmp_path, damage, words, library_refuses):
    path = damaged(tmp_path, **damage)
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    msg = str(info.value)
    assert path.name in msg and "\n" not in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in: {msg}"
    if library_refuses:  # the same rule as the format's reference implementation (safetensors 0.8 lets the others
        with pytest.raises(Exception):  # through: the last duplicate wins, a list is read as the entry's fields)
            load_file(path)


@pytest.mark.parametrize("damage", [
    pytest.param(dict(edit=lambda h: h.update(__metadata__=None)), id="__metadata__ null"),
    pytest.param(dict(edit=lambda h: h.pop("__metadata__")), id="no __metadata__"),
    pytest.param(dict(edit=lambda h: h[B].update(note={"x": [1, 2.5, None]})), id="an extra field in an entry"),
    pytest.param(dict(text=lambda r: r.replace(b"alphas_cumprod", b"\\u0061lphas_cumprod", 1)), id="escaped name"),
])
def test_valid_variants_load_like_the_library(tmp_path, damage):
    path = damaged(tmp_path, **damage)
    assert outcome(path) == "both load"


def test_zero_size_tensors_share_an_offset(tmp_path):
    path = tmp_path / "empty_tensors.safetensors"
    save_file({"a": torch.zeros(0), "b": torch.zeros(0, 4), "c": torch.ones(2), "d": torch.zeros(3, 0)}, path)
    assert outcome(path) == "both load"
    assert SafetensorsFile(path).shapes == {"a": (0,), "b": (0, 4), "c": (2,), "d": (3, 0)}


@pytest.mark.parametrize("damage, words", [pytest.param(*row[1:3], id=row[0]) for row in ISSUE_ROWS])
def test_cli_reports_a_damaged_checkpoint_in_one_line(tmp_path, damage, words, capsys):
    weights = damaged(tmp_path, **damage)
    content, style = gradient(tmp_path / "c.png", (64, 64)), gradient(tmp_path / "s.png", (64, 64), flip=True)
    config = write_config(tmp_path / "run.yaml", weights=weights)
    output = tmp_path / "out.png"
    rc = train_free_run.main([str(a) for a in ("--content", content, "--style", style, "--config", config,
                                                "--output", output, "--quiet")])
    err = capsys.readouterr().err
    assert rc == 2 and not output.exists()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert weights.name in err and all(word in err for word in words), err


# ---------------------------------------------------------------------------------------------------------------------
# The property: any single-byte change of the header is either refused with a CheckpointError or loads exactly what
# the safetensors library loads.

FLIPS = 300
# Refusals of files the library reads: rules the loader keeps on purpose (README "Checkpoints").
STRICTER = ("duplicate key", "not an object", "is not one this loader reads")


def read_all(path: Path) -> dict[str, torch.Tensor]:
    file = SafetensorsFile(path)
    return {key: file.tensor(key) for key in file.shapes}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes (bit patterns, so NaN payloads compare too)."""
    def raw(t):
        return t.reshape(-1).view(torch.uint8)
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(raw(a[k]), raw(b[k])) for k in a)


def outcome(path: Path) -> str:
    """'both load' (the same tensors), 'both refuse', 'stricter: <message>'; anything else fails the test."""
    try:
        library = load_file(path)
    except Exception:  # the library's own error type, or whatever it raises
        library = None
    try:
        ours = read_all(path)
    except CheckpointError as e:
        if library is None:
            return "both refuse"
        assert any(rule in str(e) for rule in STRICTER), f"refused a file the library reads: {e}"
        return f"stricter: {e}"
    assert library is not None, "loaded a file the library refuses"
    assert same_tensors(ours, library), "loaded other tensors than the library"
    return "both load"


def small_file(path: Path) -> Path:
    """Every dtype the loader reads, a scalar, empty tensors, metadata: a header where a flip can hit any rule."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "float.weight": torch.randn(3, 2, generator=g), "half.weight": torch.randn(5, generator=g).half(),
        "bfloat.weight": torch.randn(2, 2, generator=g).bfloat16(), "double.bias": torch.randn(2, generator=g).double(),
        "long.ids": torch.arange(3), "int.ids": torch.arange(2, dtype=torch.int32),
        "short.ids": torch.arange(4, dtype=torch.int16), "byte.ids": torch.arange(4, dtype=torch.uint8),
        "char.ids": torch.arange(3, dtype=torch.int8), "bool.mask": torch.tensor([True, False]),
        "scalar.value": torch.tensor(1.5), "empty.rows": torch.zeros(0, 3), "empty.vector": torch.zeros(0),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "note": "a small file"})
    return path


def test_single_byte_flips_of_the_header_load_like_the_library_or_are_refused(tmp_path):
    blob = small_file(tmp_path / "small.safetensors").read_bytes()
    end = 8 + struct.unpack("<Q", blob[:8])[0]  # the length and the JSON header
    rng = random.Random(16)
    structural = b'0123456789"{}[],:- .eE\\nNtfaSFIUB'  # half the flips: characters JSON and the header are made of
    path = tmp_path / "flipped.safetensors"
    seen: dict[str, int] = {}
    for _ in range(FLIPS):
        at = rng.randrange(end)
        value = rng.choice(structural) if rng.random() < 0.5 else rng.randrange(256)
        if value == blob[at]:
            continue
        path.write_bytes(blob[:at] + bytes([value]) + blob[at + 1:])
        try:
            result = outcome(path)
        except AssertionError as e:
            raise AssertionError(f"byte {at} set to {value:#04x}: {e}") from None
        kind = result.split(":")[0]
        seen[kind] = seen.get(kind, 0) + 1
    # the flips reach both sides: valid files that load, and damage of many kinds that is refused
    assert seen.get("both load", 0) >= 20 and seen.get("both refuse", 0) >= 150, seen


# ---------------------------------------------------------------------------------------------------------------------
# Errors of the file system

DATA_START = 8 + struct.unpack("<Q", TINY.read_bytes()[:8])[0]  # where the tiny checkpoint's tensor bytes begin


class BadSectors(io.FileIO):
    """A file whose reads fail with EIO from ``DATA_START`` on, as a failing disk fails in the middle of a file."""

    def readinto(self, buffer):
        if self.tell() >= DATA_START:
            raise OSError(errno.EIO, "Input/output error")
        return super().readinto(buffer)


@pytest.mark.parametrize("case", ["permission denied", "I/O error at open", "I/O error inside a tensor"])
def test_read_errors_are_checkpoint_errors(tmp_path, monkeypatch, case):
    """An OSError from the file (as the root user of CI can only see it simulated) is one CheckpointError naming the
    file, the error, and the tensor whose bytes could not be read."""
    import builtins

    path = tmp_path / "unreadable.safetensors"
    path.write_bytes(TINY.read_bytes())
    real_open = builtins.open

    def failing_open(file, *args, **kwargs):
        if Path(str(file)) != path:
            return real_open(file, *args, **kwargs)
        if case == "permission denied":
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        if case == "I/O error at open":
            raise OSError(errno.EIO, "Input/output error", str(file))
        return io.BufferedReader(BadSectors(file, "r"))

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(CheckpointError) as info:
        load_sd15(path, hparams=HPARAMS)
    msg = str(info.value)
    assert "cannot read" in msg and path.name in msg and "\n" not in msg, msg
    assert ("Permission denied" if case == "permission denied" else "Input/output error") in msg
    if case == "I/O error inside a tensor":
        assert "tensor " + UNET_PREFIX in msg  # the UNet is read first


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_named_pipe_where_the_checkpoint_should_be(tmp_path):
    """A FIFO is refused by its type: opening it to read would wait forever for a writer.  While the test runs, a
    thread plays that writer (opening and closing the FIFO whenever a reader waits), so that a loader that opens the
    FIFO reads an empty file and fails the test instead of hanging it."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    done = threading.Event()

    def writer():
        while not done.wait(0.05):
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(CheckpointError, match="not a file"):
            SafetensorsFile(fifo)
    finally:
        done.set()
        thread.join()
