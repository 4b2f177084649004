"""Reading a safetensors file with plain file reads, one tensor at a time, after checking its header as strictly as
the format requires.

The safetensors format: an 8-byte little-endian header length n, n bytes of UTF-8 JSON
{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}, then the tensors' raw
little-endian bytes.  Reading it with plain file reads, one tensor at a time, keeps the peak memory of a load at the
size of the model (a memory map would add the whole file to the resident set).  The header is checked first, as
strictly as the safetensors library checks it (``parse_header``, ``header_problem``): a damaged file is refused
before any tensor is read, instead of loading shifted or overlapping bytes as weights.
"""
from __future__ import annotations

import json
import math
import struct
from collections import Counter
from pathlib import Path
from reprlib import repr as _short  # a repr cut to a few items: messages stay one short line

import torch

from .errors import CheckpointError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
HEADER_LIMIT = 100_000_000  # bytes; the library refuses longer headers
U64 = 2 ** 64  # dimensions, offsets and sizes are unsigned 64-bit numbers in the format


class SafetensorsFile:
    """Keys, shapes and (on demand) tensors of a safetensors file; never runs code from the file."""

    def __init__(self, path: str | Path, what: str = "checkpoint"):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{what} file {self.path} does not exist")
        if not self.path.is_file():
            raise CheckpointError(f"{what} path {self.path} is not a file")
        try:
            pickle = self.path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(self.path)
            if not pickle:
                self._entries, self._data_start = _read_header(self.path, what)
        except OSError as e:  # permission denied, I/O error
            raise CheckpointError(f"cannot read {what} {self.path} ({e.strerror or e})") from None
        if pickle:
            raise CheckpointError(
                f"{what} {self.path} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "use the .safetensors release of the model (or convert it once in a trusted environment)"
            )
        self.shapes = {k: tuple(v["shape"]) for k, v in self._entries.items()}

    def nbytes(self, key: str) -> int:
        begin, end = self._entries[key]["data_offsets"]
        return end - begin

    def tensor(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``, read into a new buffer, or into ``out`` (a CPU uint8 tensor of at least its size, e.g.
        pinned memory: the result is then a view of ``out``)."""
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin) if out is None else out[: end - begin].numpy()
        try:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                complete = f.readinto(buffer) == len(buffer)
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {key} from {self.path} ({e.strerror or e})") from None
        if not complete:
            raise CheckpointError(f"{self.path} is truncated inside tensor {key}; download it again")
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if not len(buffer):
            return torch.empty(entry["shape"], dtype=dtype)
        if out is not None:
            return out[: end - begin].view(dtype).reshape(entry["shape"])
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return False
    return head[:2] == b"PK" or head[:1] == b"\x80"  # a torch zip archive, or a bare pickle stream


def _read_header(path: Path, what: str) -> tuple[dict[str, dict], int]:
    """The header's tensor entries and where the data starts; a plain message for any file that breaks the format."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        raw = f.read(n) if n is not None and n <= min(size - 8, HEADER_LIMIT) else None
    if size == 0:
        problem = "is empty"
    elif n is None:
        problem = "is too short to be a safetensors file"
    elif n > HEADER_LIMIT:
        problem = f"is not a safetensors file (header length {n} is over the format's limit of {HEADER_LIMIT})"
    elif raw is None:
        problem = f"is truncated, or not a safetensors file (header length {n}, but {size - 8} bytes follow it)"
    else:
        try:
            header = parse_header(raw)
        except (ValueError, RecursionError) as e:
            problem = f"is not a safetensors file (header: {e})"
        else:
            problem = header_problem(header, size - 8 - n)
    if problem:
        raise CheckpointError(f"{what} {path} {problem}; download it again")
    return {k: v for k, v in header.items() if k != "__metadata__"}, 8 + n


def parse_header(raw: bytes) -> dict:
    """The JSON object in ``raw``, read as strictly as the safetensors library reads it (UTF-8, no NaN or Infinity,
    numbers within a double's range, no lone surrogate escape) and with no duplicate key, which the format disallows
    (the library lets duplicate tensor names through).  Raises ValueError naming the problem."""
    def unique(pairs: list) -> dict:
        if len(obj := dict(pairs)) < len(pairs):
            raise ValueError(f"duplicate key {next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)!r}")
        return obj

    def refuse(text: str):
        raise ValueError(f"{text} is not JSON")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8: byte {raw[e.start]:#04x} at {e.start}") from None
    header = json.loads(text, object_pairs_hook=unique, parse_constant=refuse,
                        parse_float=lambda t: float(t) if math.isfinite(float(t)) else refuse(f"{t} (too large)"),
                        parse_int=lambda t: -0.0 if t == "-0" else int(t))  # -0 is a float to the library
    if not isinstance(header, dict):
        raise ValueError(f"a JSON {type(header).__name__}, not an object")
    json.dumps(header, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape (\ud800) fails here
    return header


def header_problem(header: dict, data_size: int) -> str | None:
    """How ``header`` breaks the safetensors format, or None; ``data_size``: the bytes after the header.

    The library's rules, and one more (entries must be objects): ``__metadata__`` (if not null) maps strings to strings;
    any other key names a tensor, whose entry has a known ``dtype``, a ``shape`` of non-negative integers and
    ``data_offsets`` [begin, end] with end - begin = element count x dtype size (other fields are ignored); sorted by
    offset, the tensors cover the data from byte 0 to its very end without gap or overlap."""
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        return f"has a corrupt header: __metadata__ is {_short(meta)}, not a map of strings to strings"
    for key, value in (meta or {}).items():
        if not isinstance(value, str):
            return f"has a corrupt header: __metadata__ {key!r} is {_short(value)}, not a string"

    def u64(x) -> bool:
        return type(x) is int and 0 <= x < U64

    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        bad = f"has a corrupt header: tensor {key!r}"
        if not isinstance(entry, dict):
            return f"{bad}: its entry {_short(entry)} is not an object with dtype, shape and data_offsets"
        if missing := [f for f in ("dtype", "shape", "data_offsets") if f not in entry]:
            return f"{bad}: its entry has no {missing[0]}"
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            return f"{bad}: dtype {_short(dtype)} is not one this loader reads ({', '.join(SAFETENSORS_DTYPES)})"
        if not (isinstance(shape, list) and all(u64(d) for d in shape)):
            return f"{bad}: shape {_short(shape)} is not a list of non-negative integers (below 2^64)"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(u64(o) for o in offsets)):
            return f"{bad}: data_offsets {_short(offsets)} are not two non-negative integers [begin, end]"
        nbytes = 1
        for d in [*shape, SAFETENSORS_DTYPES[dtype].itemsize]:  # in this order, as the library overflows
            if (nbytes := nbytes * d) >= U64:
                return f"{bad}: shape {shape} of {dtype} is 2^64 bytes or more"
        if offsets[1] - offsets[0] != nbytes:
            return (f"{bad}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but shape {shape} of {dtype} "
                    f"needs {nbytes}")
        spans.append((offsets, key))

    end, previous = 0, None
    for (begin, stop), key in sorted(spans):
        if begin != end:
            where = (f"start at {begin}, but the first tensor must start at 0" if previous is None else
                     f"overlap tensor {previous!r}, which ends at {end}" if begin < end else
                     f"leave a gap after tensor {previous!r}, which ends at {end}")
            return f"has a corrupt header: tensor {key!r}: data_offsets {[begin, stop]} {where}"
        end, previous = stop, key
    if end > data_size:
        return f"is truncated (the header describes {end} bytes of tensor data, the file holds {data_size})"
    if end < data_size:
        extra = data_size - end
        return (f"has {extra} byte{'s' if extra > 1 else ''} after the last tensor (the tensors must end at the end of "
                "the file: a wrong header length, or data appended?)")
    return None
