"""The ``plain`` recipe: the self-attention SD1.5 was trained with (paper eq. 3).

Every layer runs it unless another recipe is installed; in FFF it is also the paper's ablation "FFA replaced by
standard attention".
"""
from __future__ import annotations

from .core import multihead_attention


def plain(layer, x):
    """x: (B, N, C), the layer's normalised input -> (B, N, C) before the layer's output projection ``to_out``."""
    q, k, v = layer.qkv(x)
    return multihead_attention(q, k, v, layer.heads)
