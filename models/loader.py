"""Load an SD1.5 single-file checkpoint (the CompVis/LDM layout) straight from safetensors.

Loading is: read the header (keys and shapes), refuse files that are not SD1.5, strip each component's prefix, apply the few
checkpoint quirks (each in one small function below), build the modules on the ``meta`` device and
``load_state_dict(strict=True, assign=True)`` the tensors, cast to ``dtype``.  Any problem raises ``CheckpointError``
with a message that names it.
"""
from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from reprlib import repr as _short  # a repr cut to a few items: messages stay one short line
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .clip import CLIPTextEncoder
from .config import SD15Config
from .errors import CheckpointError
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import AutoencoderKL

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


@dataclass
class SD15:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: Tokenizer
    config: SD15Config
    path: Path
    vae_path: Path | None = None


# ---------------------------------------------------------------------------------------------------------------------
# The file


# The safetensors format: an 8-byte little-endian header length n, n bytes of UTF-8 JSON
# {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}, then the tensors' raw
# little-endian bytes.  Reading it with plain file reads, one tensor at a time, keeps the peak memory of a load at the
# size of the model (a memory map would add the whole file to the resident set).  The header is checked first, as
# strictly as the safetensors library checks it (``parse_header``, ``header_problem``): a damaged file is refused
# before any tensor is read, instead of loading shifted or overlapping bytes as weights.
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

    def tensor(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        try:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                complete = f.readinto(buffer) == len(buffer)
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {key} from {self.path} ({e.strerror or e})") from None
        if not complete:
            raise CheckpointError(f"{self.path} is truncated inside tensor {key}; download it again")
        if not buffer:
            return torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        return torch.frombuffer(buffer, dtype=SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


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


# ---------------------------------------------------------------------------------------------------------------------
# Which model is this?


def check_is_sd15(shapes: Mapping[str, tuple], cfg: SD15Config, path: Path) -> None:
    """Name the model family when the file is not an SD1.x text-to-image checkpoint."""
    keys = shapes.keys()

    def refuse(what: str) -> None:
        raise CheckpointError(f"{path} is {what}, not an SD1.5 checkpoint; use an SD1.5 model such as RealisticVisionV6")

    if any(k.startswith("conditioner.embedders.") for k in keys) or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        refuse("an SDXL checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        refuse("an SD2.x checkpoint (OpenCLIP ViT-H text encoder)")
    ctx = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if ctx is not None and ctx[1] != cfg.context_dim:
        refuse(f"a model with {ctx[1]}-wide text conditioning (SD2.x?)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != cfg.in_channels:
        refuse("an inpainting checkpoint (9-channel UNet input)" if conv_in[1] == 9 else f"a {conv_in[1]}-channel UNet")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "unet.", "text_model.", "encoder.down_blocks.")) for k in keys):
            refuse("a diffusers-format model part")
        if any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in keys):
            refuse("a VAE file (pass it with vae= / --vae)")
        refuse("not a Stable Diffusion file (no model.diffusion_model.* tensors; a LoRA or an embedding?)")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint quirks, one function each.  Each maps {checkpoint key: key of our module} for one component.


def is_extra(key: str) -> bool:
    """Tensors real checkpoints carry beside the weights, which we ignore.

    Schedule buffers (``betas``, ``alphas_cumprod``, ... : top-level names without a dot), the ``model_ema.*`` copy
    (the non-EMA weights under ``model.diffusion_model.`` are used), CLIP's ``position_ids`` (merges store them as
    floats; positions are computed with arange), and the training loss of standalone VAE files (``loss.*``).
    """
    return "." not in key or key.startswith(("model_ema.", "loss.")) or key.endswith("position_ids")


def text_encoder_key(key: str) -> str:
    """transformers >= 4.19 nests the CLIP text model under ``text_model.``; older checkpoints do not."""
    return key.removeprefix("text_model.")


def vae_attention_as_conv(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """VAEs converted from diffusers store the mid-block attention q/k/v/proj_out as linear (C, C) weights."""
    if ".attn_1." in key and key.endswith(".weight") and tensor.dim() == 2:
        return tensor[:, :, None, None]
    return tensor


# ---------------------------------------------------------------------------------------------------------------------


def component_keys(shapes: Mapping[str, tuple], prefix: str, rename: Callable[[str], str] = str) -> dict[str, str]:
    """{module key: checkpoint key} of the tensors under ``prefix``, extras left out."""
    return {rename(k[len(prefix):]): k for k in shapes if k.startswith(prefix) and not is_extra(k)}


def load_component(
    module_factory: Callable[[], nn.Module],
    file: SafetensorsFile,
    keys: dict[str, str],
    name: str,
    *,
    prefix: str = "",
    device: torch.device | str,
    dtype: torch.dtype,
    fix: Callable[[str, torch.Tensor], torch.Tensor] = lambda key, t: t,
) -> nn.Module:
    """Build ``module_factory()`` without memory, check its keys and shapes against ``keys``, load strictly.

    ``prefix`` is only used to name missing tensors by their full checkpoint key.
    """
    with torch.device("meta"):
        module = module_factory()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(keys))
    unexpected = sorted(set(keys) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file.path}: the {name} does not match SD1.5 ({_listing('missing', [prefix + k for k in missing])}"
            f"{'; ' if missing and unexpected else ''}{_listing('unexpected', [keys[k] for k in unexpected])})"
        )
    state = {}
    for key, ckpt_key in keys.items():
        tensor = fix(key, file.tensor(ckpt_key))
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(
                f"{file.path}: tensor {ckpt_key} has shape {tuple(tensor.shape)}, the {name} expects {expected[key]}"
                " (wrong model, or wrong hparams)"
            )
        state[key] = tensor.to(device=device, dtype=dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _listing(kind: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:5])
    return f"{len(names)} {kind} tensor(s): {shown}{', ...' if len(names) > 5 else ''}"


def load_sd15(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae: str | Path | None = None,
    hparams: SD15Config | Mapping[str, Any] | str | Path | None = None,
    vae_dtype: torch.dtype | None = None,
) -> SD15:
    """Load UNet, VAE and text encoder of an SD1.5 single-file ``.safetensors`` checkpoint.

    ``vae``: a separate VAE file (keys with or without ``first_stage_model.``), used instead of the baked one.
    ``hparams``: overrides of the SD1.5 hyper-parameters (mapping, ``SD15Config`` or YAML/JSON path).
    ``vae_dtype``: the VAE's dtype when it differs from ``dtype`` (fp16 SD VAEs overflow: run them in float32).
    """
    cfg = SD15Config.from_overrides(hparams)
    ckpt = SafetensorsFile(path)
    check_is_sd15(ckpt.shapes, cfg, ckpt.path)

    vae_file, vae_keys = ckpt, component_keys(ckpt.shapes, VAE_PREFIX)
    if vae is not None:
        vae_file = SafetensorsFile(vae, what="VAE")
        vae_keys = component_keys(vae_file.shapes, VAE_PREFIX) or component_keys(vae_file.shapes, "")
        if not any(k.startswith("decoder.") for k in vae_keys):
            raise CheckpointError(f"VAE {vae_file.path} holds no LDM-layout VAE (encoder.*/decoder.* tensors)")
    elif not vae_keys:
        raise CheckpointError(
            f"{ckpt.path} has no VAE weights (first_stage_model.*); pass a VAE file with vae= (CLI: --vae), "
            "e.g. vae-ft-mse-840000-ema-pruned.safetensors"
        )

    common = dict(device=device, dtype=dtype)
    unet_keys = component_keys(ckpt.shapes, UNET_PREFIX)
    unet = load_component(lambda: UNet(cfg), ckpt, unet_keys, "UNet", prefix=UNET_PREFIX, **common)
    text_keys = component_keys(ckpt.shapes, TEXT_PREFIX, rename=text_encoder_key)
    nested = any(k.startswith(TEXT_PREFIX + "text_model.") for k in text_keys.values())
    text_prefix = TEXT_PREFIX + ("text_model." if nested else "")
    text_encoder = load_component(lambda: CLIPTextEncoder(cfg), ckpt, text_keys, "text encoder", prefix=text_prefix,
                                  **common)
    vae_prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in vae_file.shapes) else ""
    autoencoder = load_component(
        lambda: AutoencoderKL(cfg), vae_file, vae_keys, "VAE", prefix=vae_prefix,
        device=device, dtype=vae_dtype or dtype, fix=vae_attention_as_conv,
    )
    return SD15(unet, autoencoder, text_encoder, Tokenizer(cfg.clip_positions), cfg, ckpt.path,
                vae_file.path if vae is not None else None)
