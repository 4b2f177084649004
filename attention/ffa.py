"""Feature Fusion Attention, the ``ffa`` recipe of FFF (paper Algorithm 1 and eq. 5)."""
from __future__ import annotations

import torch

from .core import adain, multihead_attention
from .recipe import StoreRecipe


def fusion_qkv(q_cs, q_c, k_c, v_c, k_s, v_s, *, alpha: float, beta: float, adain_values: bool = True):
    """Algorithm 1, lines 3-5: Q = alpha Q^C + beta Q^CS, K = [K^C, K^S], V = [AdaIN(V^C, V^S), V^S].

    q_cs: (B, N, C); q_c, k_c, v_c: (1 or B, N, C); k_s, v_s: (1 or B, M, C), the cached features all with the same
    batch; alpha and beta numbers or 0-dim tensors.  Returns q (B, N, C), k and v (1 or B, N + M, C).
    """
    q = alpha * q_c + beta * q_cs  # line 3, eq. 5
    k = torch.cat([k_c, k_s], dim=1)  # line 4
    v_cs = adain(v_c, v_s, dim=1) if adain_values else v_c  # AdaIN over tokens, per channel
    v = torch.cat([v_cs, v_s], dim=1)  # line 5
    return q, k, v


def feature_fusion_attention(
    q_cs: torch.Tensor,
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    k_s: torch.Tensor,
    v_s: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    heads: int,
    adain_values: bool = True,
) -> torch.Tensor:
    """Algorithm 1, lines 3-6, up to the output projection and the residual (which the layer adds).

    q_cs: (B, N, C) query of the image being generated.  q_c, k_c, v_c: (1 or B, N, C) cached content features;
    k_s, v_s: (1 or B, M, C) cached style features; batch 1 broadcasts over B.  Returns (B, N, C).
    """
    q, k, v = fusion_qkv(q_cs, q_c, k_c, v_c, k_s, v_s, alpha=alpha, beta=beta, adain_values=adain_values)
    return multihead_attention(q, k, v, heads)  # line 6: softmax(Q K^T / sqrt(d)) V


class FFA(StoreRecipe):
    """Replaces self-attention in the chosen layers during FFF; the store supplies the content and style inputs."""

    def __init__(self, store, *, alpha: float, beta: float, adain_values: bool = True):
        super().__init__(store)
        self.alpha, self.beta = store.setting("ffa.alpha", alpha), store.setting("ffa.beta", beta)  # numbers, or
        self.adain_values = adain_values  # 0-dim tensors read by a compiled UNet (FeatureStore.setting)

    def qkv(self, layer, x, h_c, h_s):
        q_c, k_c, v_c = layer.qkv(h_c)  # Q^C, K^C, V^C (eq. 3), from the cached content input
        k_s, v_s = layer.to_k(h_s), layer.to_v(h_s)  # K^S, V^S
        q_cs = layer.to_q(x)  # line 2: Q^CS from the current features
        q, k, v = fusion_qkv(q_cs, q_c, k_c, v_c, k_s, v_s,
                             alpha=self.alpha, beta=self.beta, adain_values=self.adain_values)
        return q, k, v, k_s.shape[1]
