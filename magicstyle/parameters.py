"""The ``parameters`` text chunk of every PNG MagicStyle writes (CLI and demo alike): what made the image."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from omegaconf import DictConfig, OmegaConf

from models.filehash import short_sha256


def png_parameters(cfg: DictConfig, files: Mapping[str, Path], content: str, style: str) -> str:
    """JSON of the resolved config, the dtypes ``auto`` resolved to, the seed, the checkpoint's file name and the first
    10 hex digits of its SHA-256 (the hash model sites show), the VAE's file name and hash, the two input names and the
    package version.  ``files``: the run's model files, as ``models.hub.fetch_all`` resolves them."""
    from . import __version__
    from .model import dtype_names

    weights, vae = Path(files["model.weights"]), files.get("model.vae")
    return json.dumps({
        "config": OmegaConf.to_container(cfg, resolve=True),
        "dtypes": dtype_names(cfg),
        "seed": cfg.seed,
        "checkpoint": weights.name,
        "checkpoint_sha256": short_sha256(weights),  # hashed once per file, then cached
        "vae": Path(vae).name if vae else None,
        "vae_sha256": short_sha256(vae) if vae else None,
        "content": content,
        "style": style,
        "version": __version__,
    })
