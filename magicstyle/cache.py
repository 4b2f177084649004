"""The inversion cache on disk (``batch.cache=DIR``): each image's CSDI result, reused by later runs and processes.

An entry is one image's ``Inversion`` (z_T, the inversion prompt's embedding and the store: per-step latents in
recompute mode, the recorded attention inputs in memory mode), named by the SHA-256 of the image file and
``inversion_key(cfg)``, so that another run, sweep, process or machine sharing the folder finds it.  Memory-mode
entries are large (about 340 MiB per image at 512 px): they are kept only with ``batch.cache_features=true``.

File layout: 8 bytes of magic, the 32-byte SHA-256 of the payload, then the payload (safetensors: the tensors, and
the steps, layers and store settings as metadata).  Entries are written to a temporary file and renamed into place,
so two processes writing the same entry leave one complete entry; an entry whose checksum does not match (a flipped
byte, a truncated copy) is reported in one line and recomputed, never used.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from attention import FeatureStore

from .config import DTYPES
from .inversion import Inversion, inversion_key
from .output import write_atomic

MAGIC = b"MSINV001"


def enabled(cfg: DictConfig) -> bool:
    """Whether this configuration's inversions go to the cache (memory-mode features only if asked)."""
    return bool(cfg.batch.cache) and (cfg.store.mode == "recompute" or cfg.batch.cache_features)


def entry(image: Path, cfg: DictConfig) -> Path:
    """The cache file of ``image`` under ``cfg``: <image content hash>-<inversion key>.inv."""
    h = hashlib.sha256()
    with open(image, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return Path(cfg.batch.cache).expanduser() / f"{h.hexdigest()[:24]}-{inversion_key(cfg)}.inv"


def encode(inv: Inversion) -> bytes:
    """One image's inversion -> the bytes of a cache entry."""
    store = inv.store
    tensors = {"z_T": inv.z_T, "context": inv.context}
    tensors.update({f"latents/{t}": v for t, v in store.latents.items()})
    names = sorted(store.features)
    tensors.update({f"features/{i}": store.features[k] for i, k in enumerate(names)})
    meta = {"timesteps": inv.timesteps, "layers": inv.layers, "mode": store.mode,
            "dtype": next(k for k, v in DTYPES.items() if v == store.dtype),
            "recorded": None if store.timesteps is None else sorted(store.timesteps), "features": names}
    payload = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      metadata={"inversion": json.dumps(meta)})
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(data: bytes, device: torch.device) -> Inversion:
    """The bytes of a cache entry -> the inversion; ValueError when they are not a complete, intact entry."""
    if data[:8] != MAGIC or len(data) < 40:
        raise ValueError("not a MagicStyle inversion cache entry")
    payload = data[40:]
    if hashlib.sha256(payload).digest() != data[8:40]:
        raise ValueError("checksum mismatch")
    tensors = {k: v.to(device) for k, v in st_load(payload).items()}
    with_meta = st_metadata(payload)
    meta = json.loads(with_meta["inversion"])
    store = FeatureStore(
        mode=meta["mode"], dtype=DTYPES[meta["dtype"]], images=tensors["z_T"].shape[0],
        timesteps=None if meta["recorded"] is None else set(meta["recorded"]),
        features={tuple(k): tensors[f"features/{i}"] for i, k in enumerate(meta["features"])},
        latents={int(k.split("/")[1]): v for k, v in tensors.items() if k.startswith("latents/")},
    )
    return Inversion(tensors["z_T"], meta["timesteps"], meta["layers"], store, tensors["context"])


def st_metadata(payload: bytes) -> dict:
    """The ``__metadata__`` of a safetensors payload (its JSON header)."""
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + n]).get("__metadata__", {})


def load(path: Path, device: torch.device) -> Inversion | None:
    """The cached inversion at ``path``, or None (missing; corrupt: said in one line, to be recomputed)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        print(f"note: cannot read inversion cache entry {path} ({e.strerror or e}); recomputing it", file=sys.stderr)
        return None
    try:
        return decode(data, device)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the bytes, the entry is not used
        print(f"note: inversion cache entry {path} is corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__});"
              " recomputing it", file=sys.stderr)
        return None


def save(path: Path, inv: Inversion) -> None:
    write_atomic(path, encode(inv), overwrite=True, what="inversion cache entry")
