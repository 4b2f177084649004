"""The ``vsp`` recipe: Visual Style Prompting (Jeong et al. 2024): the style image's keys and values replace the
generated image's own; its query stays."""
from __future__ import annotations

import torch

from .core import multihead_attention
from .recipe import StoreRecipe


def vsp_attention(q_cs: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, *, heads: int) -> torch.Tensor:
    """Q = Q^CS, K = K^S, V = V^S, out = softmax(Q K^T / sqrt(d)) V.

    q_cs: (B, N, C) query of the image being generated; k_s, v_s: (1 or B, M, C) the style's cached key and value.
    Returns (B, N, C), before the layer's output projection.
    """
    return multihead_attention(q_cs, k_s, v_s, heads)


class VSP(StoreRecipe):
    def qkv(self, layer, x, h_c, h_s):
        k_s, v_s = layer.to_k(h_s), layer.to_v(h_s)  # K^S, V^S (eq. 3)
        return layer.to_q(x), k_s, v_s, k_s.shape[1]  # every key is the style's
