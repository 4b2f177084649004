"""The ``styleid`` recipe: StyleID (Chung et al., CVPR 2024), the method MagicStyle says it follows (Sec. III-B).

Query preservation and attention temperature scaling: the generated image keeps a blend of its content's query and
attends only to the style image, with sharpened attention.  StyleID's AdaIN start of the latent is ``ffa.adain_latents``
(shared with FFA), its layers are ``ffa.layers``.
"""
from __future__ import annotations

import torch

from .core import multihead_attention
from .recipe import StoreRecipe


def styleid_qkv(q_cs, q_c, k_s, v_s, *, gamma: float, temperature: float):
    """Q = T (gamma Q^C + (1 - gamma) Q^CS), K = K^S, V = V^S: the temperature T is folded into the query, so that
    standard attention softmax(Q K^T / sqrt(d)) V is StyleID's softmax(T Q~ K^T / sqrt(d)) V."""
    q = temperature * (gamma * q_c + (1.0 - gamma) * q_cs)
    return q, k_s, v_s


def styleid_attention(
    q_cs: torch.Tensor, q_c: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, *, gamma: float, temperature: float,
    heads: int,
) -> torch.Tensor:
    """StyleID: Q~ = gamma Q^C + (1 - gamma) Q^CS, K = K^S, V = V^S, out = softmax(T Q~ K^T / sqrt(d)) V.

    q_cs: (B, N, C) query of the image being generated; q_c: (1 or B, N, C) the content's cached query; k_s, v_s:
    (1 or B, M, C) the style's cached key and value.  Returns (B, N, C), before the layer's output projection.
    """
    return multihead_attention(*styleid_qkv(q_cs, q_c, k_s, v_s, gamma=gamma, temperature=temperature), heads)


class StyleID(StoreRecipe):
    def __init__(self, store, *, gamma: float, temperature: float):
        super().__init__(store)
        self.gamma = store.setting("styleid.gamma", gamma)  # numbers, or 0-dim tensors read by a compiled UNet
        self.temperature = store.setting("styleid.temperature", temperature)  # (FeatureStore.setting)

    def qkv(self, layer, x, h_c, h_s):
        q_c, k_s, v_s = layer.to_q(h_c), layer.to_k(h_s), layer.to_v(h_s)  # Q^C; K^S, V^S (eq. 3)
        q, k, v = styleid_qkv(layer.to_q(x), q_c, k_s, v_s, gamma=self.gamma, temperature=self.temperature)
        return q, k, v, k.shape[1]  # every key is the style's
