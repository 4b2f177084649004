"""Where the style went: the share of attention each generated pixel gives to the style keys during FFF.

In FFA (Algorithm 1, lines 3-6) every query of the generated image attends over [K^C, K^S]; the softmax mass on K^S
is the part of that pixel's attention output drawn from the style image.  The map is that mass, averaged over heads,
guidance rows, the chosen layers (each resized to the latent grid) and the FFA steps, drawn over the result.

``run_fff`` is the demo's one call into FFF.  It observes the chosen layers with forward pre-hooks; this stand-in
goes when ``fff(..., diagnostics=...)`` is on main.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..pipeline import Inversion, fff, select_layers

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
    """Forward pre-hook of an FFA layer: adds that layer's style attention mass at the current step to the map."""

    def __init__(self, inversion: Inversion, alpha: float, beta: float, grid: tuple[int, int]):
        self.store, self.alpha, self.beta, self.grid = inversion.store, alpha, beta, grid
        self.total, self.count = torch.zeros(grid), 0

    @torch.no_grad()
    def __call__(self, layer, args):
        x = args[0]  # (B, N, C): the layer's normalised input
        if not self.store.active:
            return
        if self.store.mode == "memory":
            h_c, h_s = (h.to(x.dtype) for h in self.store.features[(layer.path, self.store.t)])
        else:  # recompute: the content and style rows ride along as the batch's last two rows
            x, h_c, h_s = x[:-2], x[-2:-1], x[-1:]
        q = self.alpha * layer.to_q(h_c) + self.beta * layer.to_q(x)  # Algorithm 1 line 3: (B, N, C)
        k = torch.cat([layer.to_k(h_c), layer.to_k(h_s)], dim=1)  # line 4: (1, N + M, C)
        heads, n = layer.heads, h_c.shape[1]
        q = q.float().unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, N, d)
        k = k.float().unflatten(-1, (heads, -1)).transpose(1, 2)  # (1, heads, N + M, d)
        share = torch.cat([
            (qc @ k.transpose(-1, -2) * qc.shape[-1] ** -0.5).softmax(-1)[..., n:].sum(-1)  # (B, heads, chunk)
            for qc in q.split(QUERY_CHUNK, dim=2)
        ], dim=-1).mean(dim=(0, 1))  # (N,)
        side = round(n ** 0.5)
        grid = share.reshape(1, 1, side, n // side)
        self.total += F.interpolate(grid, size=self.grid, mode="bilinear", align_corners=False)[0, 0].cpu()
        self.count += 1

    def result(self) -> HeatMap | None:
        return HeatMap(self.total / self.count) if self.count else None


def run_fff(sd, inversion: Inversion, cfg, *, progress=None, stats=None, heatmap: bool = True):
    """FFF, and the heat map of its style attention when ``heatmap`` and the recipe attends to style keys (ffa).

    Returns (z_0^CS (1, 4, h, w), HeatMap or None)."""
    if not heatmap or cfg.ffa.recipe != "ffa":
        return fff(sd, inversion, cfg, progress=progress, stats=stats), None
    observer = StyleShare(inversion, cfg.ffa.alpha, cfg.ffa.beta, tuple(inversion.z_T.shape[-2:]))
    with ExitStack() as hooks:
        for path in select_layers(sd.unet, cfg.ffa.layers):
            hooks.callback(sd.unet.get_submodule(path).register_forward_pre_hook(observer).remove)
        z = fff(sd, inversion, cfg, progress=progress, stats=stats)
    return z, observer.result()
