"""Where the style went: the share of attention each generated pixel gives to the style keys during FFF.

A recipe built on ``attention.recipe.StoreRecipe`` (ffa and the other store recipes) attends with queries q over keys
k whose last ``style_keys`` keys are the style image's; the softmax mass on those keys is the part of that pixel's
attention output drawn from the style image.  The map is that mass, averaged over heads, rows, the chosen layers (each
resized to the latent grid) and the steps the recipe runs at, drawn over the result.  Plain attention has no style
keys, and so no map.

``StyleShare`` fills the ``diagnostics`` slot of ``fff``: ``begin(layers, timesteps, pairs, size)`` returns the
store's observer.  It stands in for ``magicstyle.diagnostics.AttentionDiagnostics`` until that is on main.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

QUERY_CHUNK = 1024  # queries per softmax block: bounds the (B, heads, chunk, N + M) logits at 512 px to ~256 MiB
# A perceptually ordered dark-to-bright colour ramp (in the manner of matplotlib's "inferno"), RGB stops.
RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


@dataclass
class HeatMap:
    values: torch.Tensor  # (h, w) float32 in [0, 1]: the mean attention mass on the style keys, latent grid

    def overlay(self, image: Image.Image, opacity: float = 0.6) -> Image.Image:
        """The map (stretched to its own min..max) in colour over a grey copy of ``image``."""
        v = self.values[None, None]
        v = F.interpolate(v, size=image.size[::-1], mode="bilinear", align_corners=False)[0, 0].numpy()
        lo, hi = float(v.min()), float(v.max())
        v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
        x = v * (len(RAMP) - 1)
        i = np.clip(x.astype(int), 0, len(RAMP) - 2)
        colour = RAMP[i] + (RAMP[i + 1] - RAMP[i]) * (x - i)[..., None]
        grey = np.asarray(image.convert("L"), np.float32)[..., None]
        out = opacity * colour + (1 - opacity) * grey
        return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


class StyleShare:
    """Diagnostics for ``fff(..., diagnostics=StyleShare())``: the mean attention mass on the style keys per pixel."""

    def __init__(self):
        self.total, self.count = None, 0

    def begin(self, layers, timesteps, pairs, size: int):
        self.grid = (size // 8, size // 8)  # the latent grid
        self.total, self.count = torch.zeros(self.grid), 0
        return self.observe

    @torch.no_grad()
    def observe(self, path, t, q, k, style_keys, heads, row_pairs) -> None:
        """q (B, Nq, C), k (1 or B, Nk, C); the last ``style_keys`` keys are the style image's."""
        if not style_keys:
            return
        q = q.float().unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, Nq, d)
        k = k.float().unflatten(-1, (heads, -1)).transpose(1, 2)  # (1 or B, heads, Nk, d)
        share = torch.cat([
            (qc @ k.transpose(-1, -2) * qc.shape[-1] ** -0.5).softmax(-1)[..., -style_keys:].sum(-1)  # (B, heads, n)
            for qc in q.split(QUERY_CHUNK, dim=2)
        ], dim=-1).mean(dim=(0, 1))  # (Nq,)
        n = share.shape[0]
        side = round(n ** 0.5)  # square images: the layer's token grid is side x side
        grid = share.reshape(1, 1, side, n // side)
        self.total += F.interpolate(grid, size=self.grid, mode="bilinear", align_corners=False)[0, 0].cpu()
        self.count += 1

    def result(self) -> HeatMap | None:
        return HeatMap(self.total / self.count) if self.count else None
