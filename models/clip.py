"""The CLIP ViT-L/14 text transformer that conditions SD1.5 (OpenAI CLIP, as packaged in the checkpoint).

Attribute names mirror the checkpoint keys under ``cond_stage_model.transformer.``: ``embeddings.token_embedding``,
``embeddings.position_embedding``, ``encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
mlp.fc1, mlp.fc2}``, ``final_layer_norm``.  Pre-LayerNorm blocks, quick-GELU, causal self-attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SD15Config


class Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(positions, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Positions come from arange, never from the checkpoint's ``position_ids`` (merges store them as floats).
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.token_embedding(tokens) + self.position_embedding(positions)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, N, d)
        return self.out_proj(h.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width)
        self.self_attn = SelfAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: SD15Config):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.clip_width, cfg.clip_heads, cfg.clip_mlp) for _ in range(cfg.clip_layers)
        )


class CLIPTextEncoder(nn.Module):
    """tokens (B, 77) -> hidden states (B, 77, width).

    ``layer="last"`` (SD1.5's convention) returns the last layer after ``final_layer_norm``.  ``layer="penultimate"``
    ("clip skip 2") returns the output of the second-to-last layer as it is, without the final LayerNorm.
    """

    def __init__(self, cfg: SD15Config):
        super().__init__()
        self.embeddings = Embeddings(cfg.clip_vocab, cfg.clip_positions, cfg.clip_width)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.clip_width)

    def forward(self, tokens: torch.Tensor, layer: str = "last") -> torch.Tensor:
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', not {layer!r}")
        layers = self.encoder.layers if layer == "last" else self.encoder.layers[:-1]
        x = self.embeddings(tokens)
        for block in layers:
            x = block(x)
        return self.final_layer_norm(x) if layer == "last" else x
