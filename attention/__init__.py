"""Attention recipes: what a self-attention layer of the UNet computes from its input.

A recipe is a callable ``recipe(layer, x) -> out``: ``x`` (B, N, C) is the layer's normalised input and ``out``
(B, N, C) goes through the layer's own output projection ``to_out``; ``layer.qkv(x)``, ``layer.to_q`` ... give the
projections, ``layer.heads`` the head count, ``layer.path`` its address.  ``models.set_recipe(unet, path, recipe)``
installs one.

``RECIPES`` lists what FFF can run in the chosen layers (config ``ffa.recipe``).  Each entry builds the recipe from
the feature store and the run configuration; a new recipe is one new file plus one ``register`` line.
"""
from __future__ import annotations

from typing import Callable

from .core import adain, multihead_attention
from .ffa import FFA, feature_fusion_attention
from .plain import plain
from .record import Record
from .store import FeatureStore

RECIPES: dict[str, Callable] = {}


def register(name: str, factory: Callable) -> None:
    """``factory(store, cfg)`` returns the recipe that FFF installs in the chosen layers."""
    RECIPES[name] = factory


register("ffa", lambda store, cfg: FFA(store, alpha=cfg.ffa.alpha, beta=cfg.ffa.beta, adain_values=cfg.ffa.adain_values))
register("plain", lambda store, cfg: plain)  # the paper's ablation: FFA replaced by standard self-attention

__all__ = [
    "FFA", "FeatureStore", "RECIPES", "Record", "adain", "feature_fusion_attention", "multihead_attention", "plain",
    "register",
]
