"""Attention recipes: what a self-attention layer of the UNet computes from its input.

A recipe is a callable ``recipe(layer, x) -> out``: ``x`` (B, N, C) is the layer's normalised input and ``out``
(B, N, C) goes through the layer's own output projection ``to_out``; ``layer.qkv(x)``, ``layer.to_q`` ... give the
projections, ``layer.heads`` the head count, ``layer.path`` its address.  ``models.set_recipe(unet, path, recipe)``
installs one.  Recipes that read CSDI's features subclass ``StoreRecipe`` (attention/recipe.py).

``RECIPES`` lists what FFF can run in the chosen layers (config ``ffa.recipe``).  Each entry builds the recipe from
the feature store and the run configuration; a new recipe is one new file plus one ``register`` line.  Each recipe
file has a pure function of the attention math beside its recipe class:

- ``ffa``: ``feature_fusion_attention``, MagicStyle's Feature Fusion Attention (Algorithm 1, eq. 5);
- ``styleid``: ``styleid_attention``, StyleID (Chung et al. 2024);
- ``vsp``: ``vsp_attention``, Visual Style Prompting (Jeong et al. 2024);
- ``stylealigned``: ``stylealigned_attention``, StyleAligned (Hertz et al. 2024);
- ``plain``: SD's own attention (eq. 3), the paper's ablation "FFA replaced by standard attention".
"""
from __future__ import annotations

from typing import Callable

from .core import adain, multihead_attention
from .ffa import FFA, feature_fusion_attention
from .plain import plain
from .recipe import StoreRecipe
from .record import Record
from .store import FeatureStore
from .stylealigned import StyleAligned, stylealigned_attention
from .styleid import StyleID, styleid_attention
from .vsp import VSP, vsp_attention

RECIPES: dict[str, Callable] = {}


def register(name: str, factory: Callable) -> None:
    """``factory(store, cfg)`` returns the recipe that FFF installs in the chosen layers (``ffa.recipe=name``)."""
    RECIPES[name] = factory


register("ffa", lambda store, cfg: FFA(store, alpha=cfg.ffa.alpha, beta=cfg.ffa.beta, adain_values=cfg.ffa.adain_values))
register("styleid", lambda store, cfg: StyleID(store, gamma=cfg.styleid.gamma, temperature=cfg.styleid.temperature))
register("vsp", lambda store, cfg: VSP(store))
register("stylealigned", lambda store, cfg: StyleAligned(store))
register("plain", lambda store, cfg: plain)  # the paper's ablation: FFA replaced by standard self-attention

__all__ = [
    "FFA", "FeatureStore", "RECIPES", "Record", "StoreRecipe", "StyleAligned", "StyleID", "VSP", "adain",
    "feature_fusion_attention", "multihead_attention", "plain", "register", "stylealigned_attention",
    "styleid_attention", "vsp_attention",
]
