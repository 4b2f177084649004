"""What the recipes of FFF share: read each row's content and style features from the store, build Q, K, V, attend.

A subclass defines ``qkv(layer, x, h_c, h_s) -> (q, k, v, style_keys)``: x (B, N, C) is the generated rows' input,
h_c and h_s (1 or B, N, C) the cached inputs of each row's content and style image, and the last ``style_keys`` keys
of k are the style image's (the diagnostics measure the attention mass on them).  A recipe that is a plain function
``recipe(layer, x)`` works too (see README, "Write your own recipe"); it just has no diagnostics.
"""
from __future__ import annotations

import torch

from .core import multihead_attention


class StoreRecipe:
    def __init__(self, store):
        self.store = store

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.store.mix(layer, x, self.mix)

    def mix(self, layer, x: torch.Tensor, h_c: torch.Tensor, h_s: torch.Tensor) -> torch.Tensor:
        q, k, v, style_keys = self.qkv(layer, x, h_c, h_s)
        self.store.observe(layer, q, k, style_keys)
        return multihead_attention(q, k, v, layer.heads)

    def qkv(self, layer, x, h_c, h_s) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError
