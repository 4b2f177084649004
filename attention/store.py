"""Where the features of CSDI's images live until FFF uses them.

CSDI inverts N >= 1 images in one batch; FFF generates one row per (content, style) pair of those images, all pairs in
one UNet batch.  What is kept per image is the *input* h of each chosen self-attention layer, not its projections:
{Q^C, K^C, V^C} = W_{Q,K,V} h^C and {K^S, V^S} = W_{K,V} h^S (paper eq. 3) are recomputed from it by the recipe.
That is the same arithmetic, with one tensor per image, layer and step instead of five.

Two modes (``store.mode``):

- ``memory``: CSDI's ``record`` recipe keeps h (tokens, C) per image, layer and timestep in ``dtype`` (float16 by
  default): ``features[(layer, t)]`` is a list with one tensor per image.
- ``recompute``: CSDI keeps only the latent (4, h, w) each UNet call saw per image and timestep (a few MB):
  ``latents[t]``, a list likewise.  During FFF the latents of the images the pairs use run through the UNet in the
  same batch as the generated rows, each image once however many pairs use it, as the last rows, with plain
  attention; the recipes take h from those rows on the fly.

One tensor per image makes cutting and merging stores (``select``, ``cat``; ``Inversion.select`` and ``Inversion.cat``)
free: they build new lists of the same tensors, so a batch run that merges each batch of content images with the
style images it keeps holds the style features once, not once per batch.

During FFF, ``pairs`` maps the generated rows to images: row i (and row i + P, the other guidance branch, when the
batch holds both) is pair i = (content image, style image).  ``mix`` hands a recipe the features of each row's own
content and style image: (1, N, C) for a single pair (broadcast over the guidance branches), else (B, N, C) row by
row.  In memory mode they come stacked per pair, (P, N, C) for the contents and for the styles, from the stored
features; in recompute mode from the reference rows, the images the pairs use once each (``reference_images``).

The pipeline moves the store to a timestep with ``step(t)``, which also sets ``on``, ``current`` (memory mode: that
step's features by layer, stacked per pair) and ``compact`` (recompute mode: the pairs as index tensors into the
reference rows, and their number); a store that records, CSDI's, has no pairs and reads nothing.  Compiled UNets
(``model.compile``, magicstyle/compiled.py): the recipes read ``on``, ``current`` and ``compact`` instead of ``t`` and
the pairs' images, and ``record`` puts its tensors in ``pending``, which the next ``step`` files under (layer, t) as
copies.  So neither a timestep nor an image index is a constant of the compiled graph: one graph serves every step,
and every batch of a grid with the same number of pairs (recompute mode: and of reference rows), whichever images they
pair.  Nothing kept points into a CUDA graph's memory, which its next replay overwrites.  TorchDynamo takes tensors
reached through the UNet's attributes (layer -> recipe -> store) as static inputs, which CUDA graphs read in place at
the address they were recorded with (a new address makes them record the graph again instead of replaying it): so
with a compiled UNet ``step`` refills the runner's ``store_buffers`` (``buffers`` here), one per layer, role and shape,
instead of making new tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch.compiler import is_compiling

from .plain import plain

# A mixing rule: (layer, x (B, N, C) of the generated rows, h_c, h_s (1 or B, N, C) of each row's content and style
# image, both with the same batch) -> (B, N, C) before the layer's output projection.
Mix = Callable[..., torch.Tensor]
# An observer of the attention a recipe computes (diagnostics): (layer path, timestep, q (B, Nq, C), k (1 or B, Nk, C),
# number of style keys at the end of k, heads, pair index of each row of q).
Observer = Callable[..., None]

MODES = ("memory", "recompute")
CFG_ROWS = ("both", "cond")


@dataclass
class FeatureStore:
    mode: str = "memory"
    dtype: torch.dtype = torch.float16
    timesteps: set[int] | None = None  # CSDI: the timesteps recorded; FFF: those the recipe runs at.  None: all
    t: int | None = None  # the timestep of the UNet call in progress, set by the pipeline
    images: int = 2  # CSDI: how many images the batch holds (the last rows of each UNet batch)
    # memory: (path, t) -> one (tokens, C) per image; recompute: t -> one (4, h, w) float32 per image
    features: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=dict)
    latents: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # FFF: the (content, style) images of each generated row; [] while recording (CSDI)
    pairs: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1)])
    cfg_rows: str = "both"  # FFF under guidance: the recipe runs in both branches' rows, or only the conditional's
    observer: Observer | None = None  # FFF: diagnostics, if asked for
    # FFF with a compiled UNet: its runner's buffers, which ``step`` fills in place (module docstring); else None
    buffers: dict | None = field(default=None, repr=False, compare=False)
    _row_pairs: list[int] = field(default_factory=list, repr=False)  # pair of each row handed to the recipe
    # set by ``step`` (see the module's docstring)
    on: bool = field(default=False, init=False, repr=False, compare=False)
    current: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False,
                                                                 compare=False)
    pending: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    compact: tuple[torch.Tensor, torch.Tensor, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"store.mode must be one of {MODES}, not {self.mode!r}")
        if self.cfg_rows not in CFG_ROWS:
            raise ValueError(f"ffa.cfg_rows must be one of {CFG_ROWS}, not {self.cfg_rows!r}")
        self.on = self.active

    @property
    def active(self) -> bool:
        """Whether the recipe runs at the current timestep.  Inside a compiled UNet: ``on``, set by ``step``."""
        if is_compiling():
            return self.on
        return self.t is not None and (self.timesteps is None or self.t in self.timesteps)

    def step(self, t: int | None) -> None:
        """Move to timestep ``t`` (None: done) before a UNet call: keep what a compiled ``record`` left in
        ``pending`` (copied out of the graph's memory, in ``dtype``), then set ``on``, ``current`` and ``compact``."""
        for path, h in self.pending.items():
            self.features[(path, self.t)] = _per_image(h, self.dtype)
        self.t, self.pending = t, {}
        self.on = self.active
        reads = self.on and self.pairs
        self.current = {path: self._per_pair(h, path) for (path, s), h in self.features.items() if s == t and reads}
        if reads and self.mode == "recompute" and self.compact is None:  # the pairs' indices: once per store
            self.compact = self._compact(self.latents[t][0].device)

    def _per_pair(self, per_image: list[torch.Tensor], path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One tensor (N, C) per image -> (h_c, h_s): each pair's content and style, (P, N, C), or (1, N, C) for a
        single pair."""
        stacked = []
        for role, images in zip(("content", "style"), zip(*self.pairs)):
            parts = [per_image[i] for i in images]
            out = self._buffer((path, role), (len(parts), *parts[0].shape), parts[0].dtype, parts[0].device)
            stacked.append(torch.stack(parts, out=out))
        return stacked[0], stacked[1]

    def _compact(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """recompute mode: each pair's content and style as indices into the reference rows (``reference_images``),
        (P,) each on ``device``, and the number of reference rows."""
        refs = self.reference_images
        index = torch.tensor([[refs.index(c), refs.index(s)] for c, s in self.pairs])  # (P, 2), on the CPU
        out = self._buffer(("compact",), index.shape, index.dtype, device)
        index = out.copy_(index) if out is not None else index.to(device)
        return index[:, 0], index[:, 1], len(refs)

    def setting(self, name: str, value: float) -> float | torch.Tensor:
        """A recipe's float setting (``ffa.beta``, ...): the number itself, or with a compiled UNet a 0-dim tensor in
        the runner's buffers, refilled by each FFF, so that a sweep over the setting replays one graph instead of
        compiling one per value (a number read in the graph would be a constant of it)."""
        first = next(iter((*self.features.values(), *self.latents.values())), None)  # one image's tensors
        buffer = self._buffer(("setting", name), (), torch.float32, first[0].device) if first else None
        return value if buffer is None else buffer.fill_(value)

    def _buffer(self, key: tuple, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The compiled runner's buffer for ``key`` and this shape (made on first use), or None without one: CUDA
        graphs read the tensors ``step`` hands the recipes in place, at the address they were recorded with, so these
        are refilled every step instead of made anew (module docstring)."""
        if self.buffers is None:
            return None
        key = (*key, tuple(shape), dtype, device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self.buffers[key]

    def _features(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """memory mode: the stored input of layer ``path`` at the current timestep, per pair (``_per_pair``): what
        ``step`` stacked, or (a store moved to ``t`` without ``step``, as some tests do) stacked now."""
        if is_compiling() or path in self.current:
            return self.current[path]
        return self._per_pair(self.features[(path, self.t)], path)

    # -- CSDI -------------------------------------------------------------------------------------------------------
    def record(self, path: str, x: torch.Tensor) -> None:
        """Keep the attention input of the images (the last ``images`` rows: the conditional branch under guidance)."""
        if not self.active:
            return
        if is_compiling():  # filed under (path, t) and copied by the next ``step``
            self.pending[path] = x[-self.images:]
        else:  # copies, not views: a view of some rows would keep the whole batch's activation alive
            self.features[(path, self.t)] = _per_image(x[-self.images:], self.dtype)

    def record_latents(self, x: torch.Tensor) -> None:
        """recompute mode: keep the latents (N, 4, h, w) the UNet sees at the current timestep (float32)."""
        if self.mode == "recompute" and self.active:
            self.latents[self.t] = _per_image(x, torch.float32)

    # -- cutting and merging (Inversion.select / Inversion.cat) -----------------------------------------------------
    def select(self, indices: Sequence[int]) -> FeatureStore:
        """The store of the images ``indices`` (in that order): the same tensors, nothing copied."""
        indices = list(indices)
        return replace(
            self, t=None, images=len(indices), pairs=[], observer=None, buffers=None,
            features={k: [v[i] for i in indices] for k, v in self.features.items()},
            latents={k: [v[i] for i in indices] for k, v in self.latents.items()},
        )

    @staticmethod
    def cat(stores: Sequence[FeatureStore]) -> FeatureStore:
        """The images of ``stores`` one after the other (the same tensors, nothing copied); they must hold the same
        mode, dtype, steps and layers."""
        first = stores[0]
        for other in stores[1:]:
            if (other.mode, other.dtype, other.timesteps) != (first.mode, first.dtype, first.timesteps) or (
                other.features.keys() != first.features.keys() or other.latents.keys() != first.latents.keys()
            ):
                raise ValueError("only inversions with the same store mode, dtype, steps and layers can be merged")
        return replace(
            first, t=None, images=sum(s.images for s in stores), pairs=[], observer=None, buffers=None,
            features={k: [h for s in stores for h in s.features[k]] for k in first.features},
            latents={k: [z for s in stores for z in s.latents[k]] for k in first.latents},
        )

    # -- FFF --------------------------------------------------------------------------------------------------------
    @property
    def reference_images(self) -> list[int]:
        """The images the pairs use, each once, in index order: the order of recompute mode's reference rows."""
        return sorted({i for pair in self.pairs for i in pair})

    def reference_rows(self) -> torch.Tensor | None:
        """recompute mode: the latents of the images the pairs use, to append to the UNet batch at this timestep."""
        if self.mode != "recompute" or not self.active:
            return None
        return torch.stack([self.latents[self.t][i] for i in self.reference_images])

    def mix(self, layer, x: torch.Tensor, mix: Mix) -> torch.Tensor:
        """Run ``mix`` on the generated rows of ``x`` with each row's own h^C and h^S at the current timestep."""
        if not self.active:
            return plain(layer, x)
        if self.mode == "memory":  # stored, stacked per pair
            generated, h = x, None
            h_c, h_s = self._features(layer.path)
        else:  # the last rows are the reference images (see ``reference_rows``)
            content, style, used = self.compact if self.compact is not None else self._compact(x.device)
            generated, h = x[:-used], x[-used:]
            h_c, h_s = h[content], h[style]
        h_c, h_s = h_c.to(x.dtype), h_s.to(x.dtype)  # (P, N, C) each, (1, N, C) for a single pair
        B, P = generated.shape[0], h_c.shape[0]
        branches = B // P  # 2 under guidance: rows [uncond pairs..., cond pairs...]
        skip = P if self.cfg_rows == "cond" and branches == 2 else 0  # unconditional rows that keep plain attention
        self._row_pairs = [r % P for r in range(skip, B)]
        if P > 1 and (B - skip) > P:  # repeated for each guidance branch the recipe runs in
            h_c, h_s = h_c.repeat((B - skip) // P, 1, 1), h_s.repeat((B - skip) // P, 1, 1)
        out = mix(layer, generated[skip:], h_c, h_s)
        parts = ([plain(layer, generated[:skip])] if skip else []) + [out]
        if h is not None:  # recompute mode's reference rows
            parts.append(plain(layer, h))
        return torch.cat(parts) if len(parts) > 1 else out

    def observe(self, layer, q: torch.Tensor, k: torch.Tensor, style_keys: int) -> None:
        """Hand a recipe's attention to the diagnostics, if any: q (B, Nq, C), k (1 or B, Nk, C), the last
        ``style_keys`` keys are the style image's.  Costs one attribute test when diagnostics are off."""
        if self.observer is not None:
            self.observer(layer.path, self.t, q, k, style_keys, layer.heads, self._row_pairs)

    @property
    def nbytes(self) -> int:
        tensors = [t for per_image in (*self.features.values(), *self.latents.values()) for t in per_image]
        return sum(t.numel() * t.element_size() for t in tensors)


def _per_image(batch: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """(N, ...) -> N tensors (...) in ``dtype``, each a copy with memory of its own: an image dropped by ``select``
    frees its features, whatever batch it was recorded in."""
    return [row.to(dtype, copy=True) for row in batch]
