"""The two pieces of arithmetic every attention recipe shares: multi-head softmax attention and AdaIN.

``multihead_attention`` runs one of ``ATTENTION_KERNELS`` on the CPU (``set_cpu_attention``; the model loader picks the
faster one for the CPU and dtype, see ``models/cpu_tuning.py``) and ``F.scaled_dot_product_attention`` elsewhere.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

QUERY_BLOCK = 1024  # query rows per block of ``chunked_attention``: (B, heads, 1024, Nk) scores at a time


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, heads, Nq, d), (B, heads, Nk, d) x2 -> (B, heads, Nq, d) through ``F.scaled_dot_product_attention``.

    On the CPU this is PyTorch's flash kernel, which writes its output in (B, Nq, heads, d) order."""
    return F.scaled_dot_product_attention(q, k, v)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = QUERY_BLOCK) -> torch.Tensor:
    """The same softmax(Q K^T / sqrt(d)) V with plain matmuls, ``block`` query rows at a time.

    The scores of a block are a (B, heads, block, Nk) matrix in the input dtype; the softmax is taken in float32
    (bfloat16 scores lose little, a bfloat16 softmax more) and cast back before the product with V."""
    d = q.shape[-1]
    k_t = (k * d**-0.5).transpose(-1, -2)  # (B, heads, d, Nk), the scale folded into K once
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    blocks = []
    for start in range(0, q.shape[-2], block):
        scores = q[..., start:start + block, :] @ k_t  # (B, heads, block, Nk)
        blocks.append(torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(v.dtype) @ v)  # (B, heads, block, d)
    return torch.cat(blocks, dim=-2) if len(blocks) > 1 else blocks[0]


ATTENTION_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "chunked": chunked_attention,
}
_cpu_kernel = "sdpa"


def set_cpu_attention(name: str) -> None:
    """Choose the kernel ``multihead_attention`` runs on CPU tensors (a name in ``ATTENTION_KERNELS``)."""
    global _cpu_kernel
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {', '.join(ATTENTION_KERNELS)}")
    _cpu_kernel = name


def cpu_attention() -> str:
    """The name of the kernel ``multihead_attention`` runs on CPU tensors."""
    return _cpu_kernel


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head (paper eq. 3).

    q: (B, Nq, C); k, v: (B or 1, Nk, C), C = heads * d (batch 1 broadcasts).  Returns (B, Nq, C), before the layer's
    output projection.
    """
    B, Nq, C = q.shape
    d = C // heads
    k, v = k.expand(B, -1, -1), v.expand(B, -1, -1)
    # (B, N, C) -> (B, heads, N, d): a strided view, no copy.
    q, k, v = (x.unflatten(-1, (heads, d)).transpose(1, 2) for x in (q, k, v))
    kernel = ATTENTION_KERNELS[_cpu_kernel] if q.device.type == "cpu" else sdpa_attention
    out = kernel(q, k, v)  # (B, heads, Nq, d)
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
