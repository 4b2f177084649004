"""The ``plain`` recipe: the self-attention SD1.5 was trained with.  Every layer uses it unless a recipe is installed."""
from __future__ import annotations

from .core import multihead_attention


def plain(layer, q, k, v):
    """q, k, v: (B, N, C) projections of the layer's input; returns (B, N, C) before ``to_out``."""
    return multihead_attention(q, k, v, layer.heads)
