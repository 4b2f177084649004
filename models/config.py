"""Hyper-parameters of Stable Diffusion 1.5, in one dataclass.

Names follow the LDM config files (``model_channels``, ``channel_mult``, ``num_heads``, ``context_dim``) with
``vae_`` and ``clip_`` prefixes for the autoencoder and the text encoder.  SD1.5's values are the defaults and are
also written out in ``configs/model/sd15.yaml``; the tiny test checkpoint overrides a few of them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import CheckpointError


@dataclass(frozen=True)
class SD15Config:
    # UNet (LDM openaimodel.UNetModel)
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a SpatialTransformer (LDM: attention_resolutions 4,2,1)
    num_heads: int = 8  # SD1.x fixes the head count; the head width grows with the channels
    transformer_depth: int = 1
    context_dim: int = 768
    # KL autoencoder (LDM AutoencoderKL, ddconfig)
    vae_in_channels: int = 3
    vae_ch: int = 128
    vae_ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    z_channels: int = 4
    # CLIP ViT-L/14 text transformer
    clip_vocab: int = 49408
    clip_positions: int = 77
    clip_width: int = 768
    clip_layers: int = 12
    clip_heads: int = 12
    clip_mlp: int = 3072

    @classmethod
    def from_overrides(cls, overrides: "SD15Config | Mapping[str, Any] | str | Path | None") -> "SD15Config":
        """SD1.5 defaults updated by a mapping, or by a YAML/JSON file holding one."""
        if overrides is None:
            return cls()
        if isinstance(overrides, SD15Config):
            return overrides
        if isinstance(overrides, (str, Path)):
            overrides = _read_mapping(Path(overrides))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise CheckpointError(f"unknown model hyper-parameter(s) {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()}
        return replace(cls(), **values)


def _read_mapping(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"hyper-parameter file {path} does not exist")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
