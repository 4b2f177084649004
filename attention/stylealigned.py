"""The ``stylealigned`` recipe: StyleAligned (Hertz et al. 2024), shared attention with AdaIN-aligned queries and
keys: the generated image attends to its own tokens and to the style image's."""
from __future__ import annotations

import torch

from .core import adain, multihead_attention
from .recipe import StoreRecipe


def stylealigned_qkv(q_cs, k_cs, v_cs, q_s, k_s, v_s):
    """Q = AdaIN(Q^CS, Q^S), K = [AdaIN(K^CS, K^S), K^S], V = [V^CS, V^S]; AdaIN per channel over the tokens."""
    B = q_cs.shape[0]
    k_s, v_s = k_s.expand(B, -1, -1), v_s.expand(B, -1, -1)
    q = adain(q_cs, q_s, dim=1)
    k = torch.cat([adain(k_cs, k_s, dim=1), k_s], dim=1)
    v = torch.cat([v_cs, v_s], dim=1)
    return q, k, v


def stylealigned_attention(
    q_cs: torch.Tensor, k_cs: torch.Tensor, v_cs: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor,
    v_s: torch.Tensor, *, heads: int,
) -> torch.Tensor:
    """StyleAligned: Q = AdaIN(Q^CS, Q^S), K = [AdaIN(K^CS, K^S), K^S], V = [V^CS, V^S], softmax(Q K^T / sqrt(d)) V.

    q_cs, k_cs, v_cs: (B, N, C) projections of the image being generated; q_s, k_s, v_s: (1 or B, M, C) the style's
    cached ones.  Returns (B, N, C), before the layer's output projection.
    """
    return multihead_attention(*stylealigned_qkv(q_cs, k_cs, v_cs, q_s, k_s, v_s), heads)


class StyleAligned(StoreRecipe):
    def qkv(self, layer, x, h_c, h_s):
        q_s, k_s, v_s = layer.qkv(h_s)  # Q^S too: one more projection of the stored input h^S
        q, k, v = stylealigned_qkv(*layer.qkv(x), q_s, k_s, v_s)
        return q, k, v, k_s.shape[1]  # the last M keys are the style's, the first N the generated image's own
