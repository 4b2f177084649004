"""The two pieces of arithmetic every attention recipe shares: multi-head softmax attention and AdaIN."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head (paper eq. 3), through ``F.scaled_dot_product_attention``.

    q: (B, Nq, C); k, v: (B or 1, Nk, C), C = heads * d (batch 1 broadcasts).  Returns (B, Nq, C), before the layer's
    output projection.
    """
    B, Nq, C = q.shape
    d = C // heads
    k, v = k.expand(B, -1, -1), v.expand(B, -1, -1)
    # (B, N, C) -> (B, heads, N, d): a strided view, no copy.
    q, k, v = (x.unflatten(-1, (heads, d)).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Nq, d)
    return out.transpose(1, 2).reshape(B, Nq, C)


def adain(content: torch.Tensor, style: torch.Tensor, dim, eps: float = 1e-5) -> torch.Tensor:
    """Adaptive instance normalisation (Huang & Belongie 2017; paper eq. 4).

    sigma(style) * (content - mu(content)) / sigma(content) + mu(style), with mean and population standard deviation
    taken over ``dim`` (kept), and ``eps`` added to the variance.  The statistics are computed in float32 at least.
    """
    dtype = torch.promote_types(content.dtype, torch.float32)
    c, s = content.to(dtype), style.to(dtype)
    c_var, c_mean = torch.var_mean(c, dim=dim, keepdim=True, correction=0)
    s_var, s_mean = torch.var_mean(s, dim=dim, keepdim=True, correction=0)
    out = (c - c_mean) * torch.rsqrt(c_var + eps) * torch.sqrt(s_var + eps) + s_mean
    return out.to(content.dtype)
