"""Where the content and style features of CSDI live until FFF uses them.

What is kept is the *input* of each chosen self-attention layer for the content and style rows, h^C and h^S
(1, N, C), not their projections: {Q^C, K^C, V^C} = W_{Q,K,V} h^C and {K^S, V^S} = W_{K,V} h^S (paper eq. 3) are
recomputed from them by the recipe.  That is the same arithmetic, with 2 tensors per layer and step instead of 5.

Two modes (``store.mode``):

- ``memory``: CSDI's ``record`` recipe keeps h^C and h^S per (layer, timestep) in ``dtype`` (float16 by default).
- ``recompute``: CSDI keeps only the latent each UNet call saw per timestep (a few MB).  During FFF the content and
  style latents run through the UNet in the same batch as the stylized rows, as its last two rows, with plain
  attention; the recipes take h^C and h^S from those rows on the fly.  No feature cache at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .plain import plain

# A mixing rule: (layer, x of the generated rows (B, N, C), h_c (1, N, C), h_s (1, N, C)) -> (B, N, C) before to_out.
Mix = Callable[..., torch.Tensor]

MODES = ("memory", "recompute")


@dataclass
class FeatureStore:
    mode: str = "memory"
    dtype: torch.dtype = torch.float16
    timesteps: set[int] | None = None  # the timesteps at which features are kept and used; None: all
    t: int | None = None  # the timestep of the UNet call in progress, set by the pipeline
    features: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # recompute: (2, 4, h, w) content and style per t

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"store.mode must be one of {MODES}, not {self.mode!r}")

    @property
    def active(self) -> bool:
        return self.t is not None and (self.timesteps is None or self.t in self.timesteps)

    # -- CSDI -------------------------------------------------------------------------------------------------------
    def record(self, path: str, x: torch.Tensor) -> None:
        """Keep the attention input of the content and style images (the last two rows) at the current timestep."""
        if self.active:
            # copies, not views: a view of a row would keep the whole batch's activation alive
            self.features[(path, self.t)] = (x[-2:-1].to(self.dtype, copy=True), x[-1:].to(self.dtype, copy=True))

    def record_latents(self, x: torch.Tensor) -> None:
        """recompute mode: keep the (content, style) latents the UNet sees at the current timestep (float32)."""
        if self.mode == "recompute" and self.active:
            self.latents[self.t] = x.float()

    # -- FFF --------------------------------------------------------------------------------------------------------
    def mix(self, layer, x: torch.Tensor, mix: Mix) -> torch.Tensor:
        """Run ``mix`` on the generated rows of ``x`` with this layer's h^C and h^S at the current timestep."""
        if not self.active:
            return plain(layer, x)
        if self.mode == "memory":
            h_c, h_s = self.features[(layer.path, self.t)]
            return mix(layer, x, h_c.to(x.dtype), h_s.to(x.dtype))
        generated, reference = x[:-2], x[-2:]  # the last two rows are content and style (see ``reference_rows``)
        return torch.cat([mix(layer, generated, reference[0:1], reference[1:2]), plain(layer, reference)])

    def reference_rows(self) -> torch.Tensor | None:
        """recompute mode: the content and style latents to append to the UNet batch at the current timestep."""
        return self.latents[self.t] if self.mode == "recompute" and self.active else None

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.features.values() for t in pair] + list(self.latents.values())
        return sum(t.numel() * t.element_size() for t in tensors)
