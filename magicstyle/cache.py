"""The inversion cache on disk (``batch.cache=DIR``): each image's CSDI result, reused by later runs and processes.

An entry is one image's ``Inversion`` (z_T, the inversion prompt's embedding and the store: per-step latents in
recompute mode, the recorded attention inputs in memory mode), named by the SHA-256 of the image file and
``inversion_key(cfg, files)`` (the checkpoint and VAE by their SHA-256), so that another run, sweep, process or
machine sharing the folder finds it.  Memory-mode
entries are large (about 340 MiB per image at 512 px): they are kept only with ``batch.cache_features=true``.

An entry is a plain safetensors file, ``<image sha256>-<inversion key>.safetensors``.  Its metadata holds the format,
the image hash and inversion key it was made for, the steps, layers and store settings, and ``sha256``: a digest of
the rest of the metadata and of every tensor's name, dtype, shape and bytes.  Entries are written to a temporary file
and renamed into place, so two processes writing the same entry leave one complete entry; an entry that does not
parse, whose digest does not match (a flipped byte, a truncated copy) or that was made for another image or key is
reported in one line and recomputed, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from attention import FeatureStore
from models.errors import first_line
from models.safetensors_file import header_problem, parse_header

from .config import DTYPES
from models.filehash import hash_file
from .inversion import Inversion, inversion_key
from .output import OutputError, write_atomic
from .progress import say

FORMAT = "magicstyle-inversion-cache/1"
SUFFIX = ".safetensors"


def enabled(cfg: DictConfig) -> bool:
    """Whether this configuration's inversions go to the cache (memory-mode features only if asked)."""
    return bool(cfg.batch.cache) and (cfg.store.mode == "recompute" or cfg.batch.cache_features)


def entry(image: Path, cfg: DictConfig, files: dict[str, Path] | None = None) -> Path:
    """The cache file of ``image`` under ``cfg`` with the run's model ``files``:
    <image content hash>-<inversion key>.safetensors."""
    return Path(os.path.expanduser(cfg.batch.cache)) / f"{hash_file(image)}-{inversion_key(cfg, files)}{SUFFIX}"


def digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata (but ``sha256``) and of each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\n{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def encode(inv: Inversion, image: str = "", key: str = "") -> bytes:
    """One image's inversion -> the bytes of a cache entry (a safetensors file) for image hash ``image``, ``key``."""
    store = inv.store
    tensors = {"z_T": inv.z_T, "context": inv.context}
    tensors.update({f"latents/{t}": _stacked(v) for t, v in store.latents.items()})
    names = sorted(store.features)
    tensors.update({f"features/{i}": _stacked(store.features[k]) for i, k in enumerate(names)})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    inversion = {"timesteps": inv.timesteps, "layers": inv.layers, "mode": store.mode,
                 "dtype": next(k for k, v in DTYPES.items() if v == store.dtype),
                 "recorded": None if store.timesteps is None else sorted(store.timesteps), "features": names}
    meta = {"format": FORMAT, "image_sha256": image, "inversion_key": key, "inversion": json.dumps(inversion)}
    meta["sha256"] = digest(meta, tensors)
    return st_save(tensors, metadata=meta)


def _stacked(per_image: list[torch.Tensor]) -> torch.Tensor:
    """The store's one tensor per image -> (N, ...) on the CPU (moved one by one: no second copy on the GPU)."""
    return torch.stack([t.cpu() for t in per_image])


def decode(data: bytes, device: torch.device, image: str | None = None, key: str | None = None) -> Inversion:
    """The bytes of a cache entry -> the inversion; ValueError when they are not a complete, intact entry (for
    ``image`` and ``key``, when given)."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else None
    if n is None or n > len(data) - 8:
        raise ValueError("truncated")
    header = parse_header(data[8:8 + n])  # ValueError: not a JSON object, duplicate keys, ...
    if problem := header_problem(header, len(data) - 8 - n):
        raise ValueError(problem.removeprefix("has a ").removeprefix("is "))
    meta = header.get("__metadata__") or {}
    tensors = st_load(data)
    if meta.get("format") != FORMAT:
        raise ValueError("not a MagicStyle inversion cache entry")
    if meta.get("sha256") != digest(meta, tensors):
        raise ValueError("checksum mismatch")
    for name, want in (("image_sha256", image), ("inversion_key", key)):
        if want is not None and meta.get(name) != want:
            raise ValueError(f"made for another {name}")
    info = json.loads(meta["inversion"])
    tensors = {k: v.to(device) for k, v in tensors.items()}
    store = FeatureStore(
        mode=info["mode"], dtype=DTYPES[info["dtype"]], images=tensors["z_T"].shape[0], pairs=[],
        timesteps=None if info["recorded"] is None else set(info["recorded"]),
        features={tuple(k): list(tensors[f"features/{i}"].unbind(0)) for i, k in enumerate(info["features"])},
        latents={int(k.split("/")[1]): list(v.unbind(0)) for k, v in tensors.items() if k.startswith("latents/")},
    )
    return Inversion(tensors["z_T"], info["timesteps"], info["layers"], store, tensors["context"])


def identity(path: Path) -> tuple[str | None, str | None]:
    """(image hash, inversion key) from an entry's file name; (None, None) for a name ``entry`` did not make."""
    image, _, key = path.name.removesuffix(SUFFIX).partition("-")
    return (image, key) if path.name.endswith(SUFFIX) and len(image) == 64 and key else (None, None)


def load(path: Path, device: torch.device) -> Inversion | None:
    """The cached inversion at ``path``, or None (missing; corrupt: said in one line, to be recomputed)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        say(f"note: cannot read inversion cache entry {path} ({e.strerror or e}); recomputing it")
        return None
    try:
        return decode(data, device, *identity(path))
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the bytes, the entry is not used
        say(f"note: inversion cache entry {path} is corrupt ({first_line(e)}); recomputing it")
        return None


def save(path: Path, inv: Inversion) -> None:
    """Write the entry; where it cannot be written (a full disk, a read-only folder) the run goes on without it: the
    inversion itself succeeded, and a later run recomputes it."""
    try:
        write_atomic(path, encode(inv, *[v or "" for v in identity(path)]), overwrite=True,
                     what="inversion cache entry")
    except OutputError as e:
        say(f"note: {first_line(e)}; going on without caching it")
