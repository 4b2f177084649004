"""TEMPORARY: the pipeline contract (N-image csdi, Inversion.select/cat, fff(pairs=...), inversion_key) over today's
2-image csdi/fff, until the pipeline branch lands.  Inverts lazily, per pair, inside fff."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from . import pipeline


def inversion_key(cfg) -> str:
    c = OmegaConf.to_container(cfg, resolve=True)
    keep = {k: c[k] for k in ("size", "steps", "inversion", "store", "model")}
    keep["seed"] = c["seed"] if c["inversion"]["sample_posterior"] else None
    keep["layers"], keep["timesteps"] = c["ffa"]["layers"], c["ffa"]["timesteps"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Inversion:
    z0: torch.Tensor

    def select(self, indices):
        return Inversion(self.z0[list(indices)])

    @staticmethod
    def cat(parts):
        return Inversion(torch.cat([p.z0 for p in parts]))

    @property
    def store(self):
        return pipeline.FeatureStore()


def csdi(sd, z0, cfg, *, progress=None, stats=None):
    if stats is not None:
        stats.update(invert_unet_calls=0, invert_unet_rows=0)
    return Inversion(z0)


def fff(sd, inv, cfg, pairs=((0, 1),), *, progress=None, stats=None, diagnostics=None):
    out, calls, rows = [], 0, 0
    for c, s in pairs:
        counts: dict = {}
        real = pipeline.csdi(sd, inv.z0[[c, s]], cfg, progress=progress, stats=counts)
        out.append(pipeline.fff(sd, real, cfg, progress=progress, stats=counts))
        calls += counts["invert_unet_calls"] + counts["generate_unet_calls"]
        rows += counts["invert_unet_rows"] + counts["generate_unet_rows"]
    if stats is not None:
        stats.update(generate_unet_calls=calls, generate_unet_rows=rows)
    return torch.cat(out)
