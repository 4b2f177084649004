"""Stand-ins for pipeline functions that are being added (the pipeline's N-image API); each goes when its original
is on main."""
from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

try:
    from ..pipeline import inversion_key
except ImportError:  # until magicstyle.pipeline has it

    def inversion_key(cfg: DictConfig) -> str:
        """A digest of every configuration value that changes CSDI's result (the model, size, steps, inversion
        settings, the layers and steps the store keeps, its mode and dtype; the seed only when it is used)."""
        c = OmegaConf.to_container(cfg, resolve=True)
        keep = {k: c[k] for k in ("size", "steps", "model", "inversion", "store")}
        keep["ffa"] = {k: c["ffa"][k] for k in ("layers", "timesteps")}
        keep["seed"] = c["seed"] if c["inversion"]["sample_posterior"] else None
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:32]

__all__ = ["inversion_key"]
